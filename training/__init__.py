"""DeepSpeed training of culture adapters and routers (installed as `moa.training`)."""

"""DeepSpeed training of culture adapters and routers."""

"""MoAForCausalLM on a CUDA GPU: the fused Triton kernels against the torch backend on the same model.

Forward (logits, loss), backward (every trainable gradient) in every routing mode, and greedy generation
with the KV cache, in float32, float16 and bfloat16. Skipped without CUDA (tests/conftest.py); `bash .ci/gpu`
runs it on a GPU machine.
"""
import pytest
import torch

import moa
from moa.layers import MoALinear
from moa.tiny import tiny_model

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max abs difference allowed, relative to the torch backend's largest absolute value
TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CULTURES = ["a", "b", "c", "d"]


def cuda_model(dtype):
    """A tiny Llama (hidden 256, 2 layers) with K=4 culture adapters of rank 16, every B non-zero, on the GPU."""
    base = tiny_model(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, dtype=dtype)
    config = moa.MoAConfig(cultures=CULTURES, r=16, alpha=32, target_modules=TARGETS)
    model = moa.MoAForCausalLM.from_base(base, config).to("cuda")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    return model


def use_backend(model, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, MoALinear):
            module.backend = backend


def close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values ({dtype})"
    scale = expected.float().abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g} ({dtype})"


@pytest.mark.parametrize("routing", ["oracle", "router", "topk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_triton_matches_torch(dtype, routing):
    model = cuda_model(dtype).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (4, 40), generator=gen).cuda()
    cultures = torch.tensor([0, 3, 1, 2], device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        use_backend(model, backend)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, culture_ids=cultures, routing=routing, top_k=2 if routing == "topk" else None)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = out.logits.detach(), out.loss.detach(), grads
    (logits, loss, grads), (want_logits, want_loss, want_grads) = results["triton"], results["torch"]
    close(logits, want_logits, dtype, "logits")
    close(loss, want_loss, dtype, "loss")
    assert sorted(grads) == sorted(want_grads) and any("lora_A" in name for name in grads)
    for name, grad in grads.items():
        close(grad, want_grads[name], dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generate_triton_matches_torch(dtype):
    """Greedy generation on the Triton backend picks, at every step, a token whose torch-backend logit is
    within tolerance of the largest (an exact tie may break either way), and its logits match torch's."""
    model = cuda_model(dtype).eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 250, (4, 12), generator=gen).cuda()
    cultures = [1, 0, 3, 2]
    use_backend(model, "triton")
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), culture_ids=cultures,
                             routing="oracle", max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 20)
    logits = {}
    for backend in ("torch", "triton"):
        use_backend(model, backend)
        with torch.no_grad():
            logits[backend] = model(input_ids=out, culture_ids=cultures, routing="oracle").logits[:, 11:-1].float()
    close(logits["triton"], logits["torch"], dtype, "logits of the generated sequence")
    reference = logits["torch"]
    chosen = reference.gather(-1, out[:, 12:, None]).squeeze(-1)
    assert (chosen >= reference.max(-1).values - TOL[dtype] * reference.abs().max()).all(), \
        "a generated token is not a greedy choice under the torch backend"

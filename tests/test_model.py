"""MoAForCausalLM: mixed-culture batches, PEFT equivalence, save/load, generation, bad input."""
import copy
import threading

import pytest
import torch
from helpers import TARGETS, fresh_base, randomize_adapters, write_peft_adapters
from peft import PeftModel

import moa
from moa.errors import UsageError

CULTURES = ["japan", "india", "nigeria"]


def moa_model(base, r=4, alpha=8, **kw):
    return moa.MoAForCausalLM.from_base(copy.deepcopy(base), moa.MoAConfig(cultures=CULTURES, r=r, alpha=alpha, **kw))


@pytest.fixture(scope="module")
def base():
    return fresh_base("llama")


@pytest.fixture(scope="module")
def peft_dirs(base, tmp_path_factory):
    return write_peft_adapters(base, tmp_path_factory.mktemp("peft"), CULTURES, r=4, alpha=8)


def tokens(batch=6, seq=12, seed=0):
    return torch.randint(3, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_mixed_batch_matches_peft_and_rows_alone(base, peft_dirs):
    model = moa_model(base, alpha=16).eval()  # a different alpha: PEFT's scaling is folded into B
    for d, c in zip(peft_dirs, CULTURES):
        model.load_peft_adapter(d, culture=c)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(peft_dirs[0]), adapter_name=CULTURES[0])
    for d, c in zip(peft_dirs[1:], CULTURES[1:]):
        peft_model.load_adapter(str(d), adapter_name=c)
    peft_model.eval()
    ids = tokens()
    rows = ["japan", "nigeria", "india", "india", "japan", "nigeria"]
    with torch.no_grad():
        mixed = model(input_ids=ids, culture_ids=rows, routing="oracle").logits
        want = peft_model(input_ids=ids, adapter_names=rows).logits
        alone = torch.cat([model(input_ids=ids[i:i + 1], culture_ids=[c], routing="oracle").logits for i, c in enumerate(rows)])
        plain = base(input_ids=ids).logits
    assert (mixed - want).abs().max() <= 1e-5
    assert (mixed - alone).abs().max() <= 1e-5
    assert (mixed - plain).abs().max() > 1e-2  # the adapters really act


def test_minus_one_is_the_base_model(base):
    model = moa_model(base)
    randomize_adapters(model)
    ids = tokens(2)
    with torch.no_grad():
        out = model(input_ids=ids, culture_ids=torch.tensor([-1, 1]), routing="oracle").logits
        torch.testing.assert_close(out[0], base(input_ids=ids[:1]).logits[0])


def test_oracle_plans_are_shared_by_later_calls(base, monkeypatch):
    """A decode loop calling forward once per step with the same cultures builds the routing plan once."""
    from moa import routing

    model = moa_model(base).eval()
    randomize_adapters(model)
    built = []
    plan_adapters = routing.plan_adapters
    monkeypatch.setattr(routing, "plan_adapters", lambda *a, **k: built.append(a[0].shape) or plan_adapters(*a, **k))
    ids = tokens(3, 5)
    with torch.no_grad():
        first = model(input_ids=ids, culture_ids=[0, 2, 1], routing="oracle").logits
        again = model(input_ids=ids, culture_ids=torch.tensor([0, 2, 1]), routing="oracle").logits
        assert len(built) == 1 and torch.equal(first, again)
        other = model(input_ids=ids, culture_ids=[1, 2, 1], routing="oracle").logits  # other cultures: a new plan
        assert len(built) == 2 and (other[0] - first[0]).abs().max() > 1e-3
        torch.testing.assert_close(other[1:], first[1:])
        for length in range(1, 6):  # 15 more (cultures, shape) keys: only the newest few are kept
            for culture in (-1, 0, 1):
                model(input_ids=ids[:1, :length], culture_ids=[culture], routing="oracle")
    assert len(model._oracle_plans) == model._oracle_plans.size
    assert len(copy.deepcopy(model)._oracle_plans) == 0  # a copy starts with no plans (and no shared lock)


def test_export_loads_in_peft(base, tmp_path):
    model = moa_model(base).eval()
    randomize_adapters(model, seed=3)
    model.export_peft_adapter("india", tmp_path / "india")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "india")).eval()
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids, culture_ids=["india"] * 6, routing="oracle").logits
        assert (peft_model(input_ids=ids).logits - want).abs().max() <= 1e-5
    # and back into another slot of a fresh model
    other = moa_model(base).eval()
    other.load_peft_adapter(tmp_path / "india", culture="japan")
    with torch.no_grad():
        assert (other(input_ids=ids, culture_ids=["japan"] * 6, routing="oracle").logits - want).abs().max() <= 1e-5


def test_save_load_identical(base, tmp_path):
    model = moa_model(base)
    randomize_adapters(model, seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["moa_adapters.safetensors", "moa_config.json"]
    loaded = moa.MoAForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=copy.deepcopy(base))
    ids = tokens()
    with torch.no_grad():
        for routing in ("oracle", "router", "topk"):
            a = model(input_ids=ids, culture_ids=[0, 1, 2, 0, 1, 2], routing=routing).logits
            b = loaded(input_ids=ids, culture_ids=[0, 1, 2, 0, 1, 2], routing=routing).logits
            assert torch.equal(a, b), routing
    # a second save replaces the first atomically and leaves no temporary directories
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_keeps_previous(base, tmp_path, monkeypatch):
    model = moa_model(base)
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "moa_adapters.safetensors").read_bytes()
    monkeypatch.setattr(model.config, "save", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    randomize_adapters(model, seed=9)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "moa_adapters.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_families_generate_with_cache(family):
    """generate with the KV cache gives the tokens and, per token, the gate logits of full forwards
    over the growing sequence: the router's running sums travel on the cache from step to step."""
    model = moa_model(fresh_base(family)).eval()
    randomize_adapters(model, std=0.2)
    ids = tokens(3, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    gate_steps = [[] for _ in model.routers]
    hooks = [router.register_forward_hook(lambda module, args, out, i=i: gate_steps[i].append(out[0]))
             for i, router in enumerate(model.routers)]
    try:
        for routing in ("oracle", "router", "topk"):
            for steps in gate_steps:
                steps.clear()
            out = model.generate(input_ids=ids, attention_mask=mask, culture_ids=[2, 0, 1], routing=routing,
                                 max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=[])
            generate_gates = [list(steps) for steps in gate_steps]
            # greedy continuation with the KV cache equals the argmax of full forwards without it
            full = out[:, :8]
            for _ in range(5):
                m = torch.cat([mask, torch.ones(3, full.shape[1] - 8, dtype=mask.dtype)], 1)
                with torch.no_grad():
                    logits = model(input_ids=full, attention_mask=m, culture_ids=[2, 0, 1], routing=routing,
                                   use_cache=False).logits
                full = torch.cat([full, logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert torch.equal(out, full), (family, routing)
            if routing == "oracle":  # oracle decoding runs no gates
                assert all(not steps for steps in generate_gates)
                continue
            # the gates of the prefill and of every decode step, against one forward over the whole sequence
            assert all(len(steps) == 5 for steps in generate_gates), [len(steps) for steps in generate_gates]
            seen = out[:, :-1]
            m = torch.cat([mask, torch.ones(3, seen.shape[1] - 8, dtype=mask.dtype)], 1)
            with torch.no_grad():
                want = model(input_ids=seen, attention_mask=m, routing=routing, use_cache=False).router_logits
            attended = m.bool()
            for layer, steps in enumerate(generate_gates):
                got = torch.cat(steps, 1)
                torch.testing.assert_close(got[attended], want[layer][attended], atol=1e-5, rtol=1e-5,
                                           msg=f"{family} {routing} layer {layer}")
    finally:
        for hook in hooks:
            hook.remove()


def test_all_linear_targets_every_linear_layer_by_name(base, tmp_path):
    """`target_modules: all-linear` (PEFT's spelling) adapts every linear layer of the decoder layers and the
    run records their names: the same model as listing them, and a saved run that reloads."""
    from moa.config_loader import from_mapping

    config = from_mapping(moa.MoAConfig, {"cultures": CULTURES, "r": 4, "alpha": 8, "target_modules": "all-linear"}, "cfg.yaml")
    assert config.target_modules == ["all-linear"]
    model = moa.MoAForCausalLM.from_base(copy.deepcopy(base), config)
    assert model.config.target_modules == sorted(TARGETS)
    listed = moa_model(base, target_modules=TARGETS)
    assert model.adapter_state_dict().keys() == listed.adapter_state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.adapter_state_dict().values(), listed.adapter_state_dict().values()))
    model.save_pretrained(tmp_path / "run")
    assert moa.MoAForCausalLM.from_pretrained(tmp_path / "run", copy.deepcopy(base)).config.target_modules == sorted(TARGETS)
    with pytest.raises(UsageError, match="'all-linear' stands alone"):
        moa.MoAConfig(cultures=CULTURES, target_modules=["all-linear", "q_proj"])


def test_router_state_goes_with_its_cache(base):
    """Forward calls that pass a KV cache on continue the gates' running sums kept for that cache, one
    typed state per cache, gone with it; two caches never mix."""
    import gc
    import weakref

    from moa import compat, routing
    from moa.routing import RouterSums, router_state

    model = moa_model(copy.deepcopy(base)).eval()
    randomize_adapters(model, std=0.2)
    ids, other = tokens(2, 9, seed=1), tokens(2, 9, seed=2)
    with torch.no_grad():
        want = model(input_ids=ids, routing="router", use_cache=False).router_logits
        first = model(input_ids=ids[:, :6], routing="router", use_cache=True)
        model(input_ids=other[:, :6], routing="router", use_cache=True)  # a second cache alongside
        state = router_state(first.cache)
        assert sorted(state.layers) == list(range(len(model.routers)))
        assert all(isinstance(sums, RouterSums) and sums.total.shape == (2, model.config.router_dim)
                   for sums in state.layers.values())
        cache, got = first.cache, [list(first.router_logits)]
        for position in range(6, 9):
            step = model(input_ids=ids[:, position:position + 1], routing="router", use_cache=True, **compat.cache_kwargs(cache))
            got.append(list(step.router_logits))
        for layer in range(len(model.routers)):
            torch.testing.assert_close(torch.cat([g[layer] for g in got], 1), want[layer], atol=1e-5, rtol=1e-5)
    gc.collect()
    held, cache_ref = len(routing._STATES), weakref.ref(cache)
    del first, step, cache, state
    gc.collect()
    assert cache_ref() is None and len(routing._STATES) == held - 1  # the state does not keep its cache alive


def test_router_logits_and_losses(base):
    model = moa_model(base, router_loss_weight=0.5)
    ids = tokens()
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, labels=labels, culture_ids=[0, 1, 2, 0, 1, 2])
    assert len(out.router_logits) == base.config.num_hidden_layers
    assert out.router_logits[0].shape == (6, 12, 3)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.router_loss)
    # every token of every row is supervised, the prompt (labels -100) included
    want = torch.stack([torch.nn.functional.cross_entropy(l.reshape(-1, 3), torch.tensor([0, 1, 2] * 2).repeat_interleave(12))
                        for l in out.router_logits]).mean()
    torch.testing.assert_close(out.router_loss, want)
    # a row whose prompt names no culture (NO_CULTURE) learns the uniform distribution: its term is KL(uniform || gate)
    from moa.routing import NO_CULTURE

    targets = torch.tensor([0, NO_CULTURE, 2, -1, 1, NO_CULTURE])
    rows = torch.tensor([0, 1, 2, 4, 5])
    want = []
    for logits in out.router_logits:
        logp = logits[rows].reshape(-1, 3).float().log_softmax(-1)
        target = targets[rows].repeat_interleave(12)
        cued = -logp[target >= 0].gather(1, target[target >= 0, None]).squeeze(1)
        uniform = (-logp[target < 0].mean(-1) - torch.log(torch.tensor(3.0)))
        want.append(torch.cat([cued, uniform]).mean())
    torch.testing.assert_close(model.router_loss(out.router_logits, targets), torch.stack(want).mean())
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "router" in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n)


def test_gates_do_not_read_the_adapters_applied(base):
    """The gates read the decoder stack's input, so which adapters run (gold, wrong or none) cannot
    change them: under gold routing in training they could otherwise read the answer."""
    model = moa_model(base)
    randomize_adapters(model, std=0.5, seed=3)
    ids = tokens()
    logits = [model(input_ids=ids, labels=ids, culture_ids=c, routing="oracle").router_logits
              for c in ([0, 1, 2, 0, 1, 2], [1, 2, 0, 1, 2, 0], [-1] * 6)]
    assert len(logits[0]) == base.config.num_hidden_layers
    for other in logits[1:]:
        for layer, (got, want) in enumerate(zip(other, logits[0])):
            torch.testing.assert_close(got, want, msg=f"layer {layer}")
    assert not torch.allclose(logits[0][0], logits[0][1])  # each layer has its own gate


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_route_probs_equal_the_gates_of_a_full_forward(family):
    """route_probs runs only the embedding layer; it must equal the gates inside a forward."""
    model = moa_model(fresh_base(family))
    for router in model.routers:
        torch.nn.init.normal_(router.score.weight, std=0.3)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, routing="router")
        want = torch.stack([logits.float().softmax(-1) for logits in out.router_logits]).mean(0)
        got = model.route_probs(ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("routing", ["oracle", "topk"])
def test_gradient_checkpointing_same_gradients(base, routing):
    grads = []
    for checkpointing in (False, True):
        model = moa_model(base)
        randomize_adapters(model, seed=5)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids = tokens()
        out = model(input_ids=ids, labels=ids, culture_ids=[0, 1, 2, 0, 1, 2], routing=routing)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_threads_do_not_share_routing(base):
    model_a, model_b = moa_model(base), moa_model(base)
    randomize_adapters(model_a, seed=1)
    randomize_adapters(model_b, seed=2)
    ids = tokens(2)
    with torch.no_grad():
        want_a = model_a(input_ids=ids, culture_ids=[0, 1], routing="oracle").logits
        want_b = model_b(input_ids=ids, culture_ids=[2, -1], routing="oracle").logits
    errors = []

    def loop(model, cultures, want):
        with torch.no_grad():
            for _ in range(10):
                if not torch.equal(model(input_ids=ids, culture_ids=cultures, routing="oracle").logits, want):
                    errors.append(cultures)

    threads = [threading.Thread(target=loop, args=(model_a, [0, 1], want_a)), threading.Thread(target=loop, args=(model_b, [2, -1], want_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_quantized_base(tmp_path, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from moa.bnb import MoALinear4bit, MoALinear8bit

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    fresh_base().save_pretrained(tmp_path / "base")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    ids = tokens(3, 10)
    with torch.no_grad():
        base_logits = quantized(input_ids=ids).logits
    model = moa.MoAForCausalLM.from_base(quantized, moa.MoAConfig(cultures=CULTURES, r=4))
    assert all(isinstance(layer, {4: MoALinear4bit, 8: MoALinear8bit}[bits]) for layer in model.lora_layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(input_ids=ids, labels=ids, culture_ids=[0, 1, 2])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.1
    # culture -1 runs the quantized base layers untouched, the trained adapters beside them
    with torch.no_grad():
        got = model(input_ids=ids, culture_ids=[-1, -1, -1], routing="oracle").logits
        trained = model(input_ids=ids, culture_ids=[0, 1, 2], routing="oracle").logits
    torch.testing.assert_close(got, base_logits)
    assert (trained - base_logits).abs().max() > 1e-2


def test_bad_input(base, peft_dirs, tmp_path):
    model = moa_model(base)
    ids = tokens(2)
    with pytest.raises(ValueError, match="culture id 3 out of range"):
        model(input_ids=ids, culture_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown culture 'france'"):
        model(input_ids=ids, culture_ids=["japan", "france"])
    with pytest.raises(ValueError, match="culture_ids has 3 entries but the batch has 2 rows"):
        model(input_ids=ids, culture_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="routing='oracle' needs culture_ids"):
        model(input_ids=ids, routing="oracle")
    with pytest.raises(ValueError, match="unknown routing 'soft'"):
        model(input_ids=ids, routing="soft")
    with pytest.raises(ValueError, match="adapter rank r=4 does not fit this model's r=8"):
        moa_model(base, r=8).load_peft_adapter(peft_dirs[0], culture="japan")
    narrow = moa.MoAForCausalLM.from_base(copy.deepcopy(base), moa.MoAConfig(cultures=CULTURES, r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter targets 'model.layers.0.mlp.down_proj', which this model does not adapt"):
        narrow.load_peft_adapter(peft_dirs[0], culture="japan")
    wide = fresh_base(hidden_size=96, num_attention_heads=4)
    wrong = write_peft_adapters(wide, tmp_path, ["wide"], r=4, targets=TARGETS)[0]
    with pytest.raises(ValueError, match=r"lora_[AB] has shape \((96, 4|4, 96)\), the base layer needs \((64, 4|4, 64)\)"):
        model.load_peft_adapter(wrong, culture="india")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        model.load_peft_adapter(tmp_path / "missing", culture="india")

"""moa.compat: the one place that reads transformers internals fails loudly when they move."""
import copy

import pytest
import torch
import transformers
from helpers import fresh_base, randomize_adapters

import moa
from moa import compat


@pytest.fixture(scope="module")
def base():
    return fresh_base("llama")


def moa_model(base):
    model = moa.MoAForCausalLM.from_base(copy.deepcopy(base), moa.MoAConfig(cultures=["japan", "india"], r=4))
    randomize_adapters(model)
    return model.eval()


def test_cache_keyword_is_the_one_transformers_uses():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert compat.CACHE_KEYWORD in CausalLMOutputWithPast.__dataclass_fields__
    assert compat.layer_cache({compat.CACHE_KEYWORD: None}) is None


def test_moa_output_carries_the_cache(base):
    model = moa_model(base)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, routing="router", use_cache=True)
    assert out.cache is not None and compat.cached_length(out.cache, 0) == 6
    # the router's sums ride on the same cache object: the next token continues from it
    with torch.no_grad():
        step = model(input_ids=ids[:, :1], routing="router", use_cache=True, **compat.cache_kwargs(out.cache))
    assert compat.cached_length(step.cache, 0) == 7


def test_missing_cache_keyword_is_an_error(base, monkeypatch):
    """If transformers renames the keyword again, per-token routing under a cache must not lose its state silently."""
    model = moa_model(base)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(compat, "CACHE_KEYWORD", "renamed_cache")
    with pytest.raises(compat.CompatError, match=r"without the 'renamed_cache' keyword.*transformers \d"):
        with torch.no_grad():
            model(input_ids=ids, routing="router")
    with pytest.raises(compat.CompatError, match="without the 'renamed_cache' keyword"):
        model.generate(input_ids=ids, routing="router", max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_cache_object_without_the_cache_api_is_an_error():
    class NotACache:
        pass

    with pytest.raises(compat.CompatError, match="is a NotACache; expected a transformers Cache with get_seq_length"):
        compat.layer_cache({compat.CACHE_KEYWORD: NotACache()})


def test_cache_without_router_state_is_an_error(base):
    """A cache holding past tokens that this model's gates never saw cannot be continued."""
    from transformers import DynamicCache

    model = moa_model(base)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model.base_model(input_ids=ids, use_cache=True)  # outside any routing call: no gates run
        cache = compat.output_cache(plain)
        assert isinstance(cache, DynamicCache)
        with pytest.raises(RuntimeError, match="holds past tokens for layer 0 but no router state"):
            model(input_ids=ids[:, :1], routing="router", use_cache=True, **compat.cache_kwargs(cache))


def test_output_and_mask_errors():
    with pytest.raises(compat.CompatError, match=f"has no '{compat.CACHE_KEYWORD}' field"):
        compat.output_cache(moa.MoACausalLMOutput() if compat.CACHE_KEYWORD != "cache" else object())
    with pytest.raises(compat.CompatError, match="got a 4-d tensor as attention_mask; expected a \\[batch, seq\\]"):
        compat.forward_attention_mask({"attention_mask": torch.ones(1, 1, 2, 2)})
    with pytest.raises(compat.CompatError, match="has no list of decoder layers"):
        compat.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_decoder_layer_wrapper_passes_through_only_what_models_read(base):
    """Frameworks tag modules with attributes (ZeRO-3 sets its hook state on every module and checks it
    with hasattr): the wrapper must not show the attributes of the layer it wraps as its own."""
    model = moa_model(base)
    layers, _ = compat.decoder_layers(model.base_model)
    wrapper = layers[0]
    wrapper.layer.framework_state = 1
    assert not hasattr(wrapper, "framework_state")
    wrapper.layer.attention_type = "full_attention"
    assert wrapper.attention_type == "full_attention"


def test_kv_caches_of_the_serving_engine():
    """The serving engine's caches: a prefill DynamicCache of full-attention layers whose tensors kv_tensors
    reads, and a cache whose layers write into a KV slab and report its window; a sliding-window model is
    refused by name rather than batched wrongly."""
    from moa.serve.kv_slab import KVSlab

    llama = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=100)
    cache = compat.new_kv_cache(llama)
    for layer in range(2):
        kv = torch.full((2, 2, 3, 8), float(layer))
        cache.update(kv, kv, layer)
    assert [(k.shape, float(v[0, 0, 0, 0])) for k, v in compat.kv_tensors(cache)] == [((2, 2, 3, 8), 0.0), ((2, 2, 3, 8), 1.0)]
    slab = KVSlab(llama, max_rows=2, max_columns=16)
    slab.join(compat.kv_tensors(cache), [1], [2])
    slab.decode_inputs()
    assert slab.cache.get_seq_length(0) == 2 == slab.cache.get_seq_length(1)
    keys, values = slab.cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 1)
    assert keys.shape == (1, 2, 3, 8) and keys[0, 0, :, 0].tolist() == [1.0, 1.0, 1.0]
    mistral = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=100, sliding_window=16)
    with pytest.raises(compat.CompatError, match="DynamicSlidingWindowLayer"):
        compat.new_kv_cache(mistral)

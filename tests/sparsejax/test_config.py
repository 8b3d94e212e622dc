"""Whole-config validation: the shipped configs pass; each kind of bad input fails naming the key,
the value and the valid choices."""
import ml_collections
import pytest

from configs import common, dense_1b, dense_tiny, nsa_1b, nsa_tiny
from sparsejax import config as config_lib


@pytest.fixture
def config():
    return dense_tiny.get_config()


@pytest.mark.parametrize("module, devices", [(dense_tiny, 1), (dense_tiny, 8), (dense_1b, 1), (dense_1b, 8),
                                             (nsa_tiny, 1), (nsa_1b, 1)])
def test_shipped_configs_are_valid(module, devices):
    config_lib.validate(module.get_config(), num_devices=devices)


def test_defaults_are_valid():
    config_lib.validate(config_lib.default_config(), num_devices=8)


def test_unknown_top_level_key(config):
    config.learning_rate = 1e-3
    with pytest.raises(ValueError, match=r"unknown key\(s\) config\.learning_rate; valid keys of config: .*'model'"):
        config_lib.validate(config)


def test_unknown_nested_key(config):
    config.model.d_modle = 64
    with pytest.raises(ValueError, match=r"config\.model\.d_modle.*valid keys of config\.model: .*'d_model'"):
        config_lib.validate(config)


def test_unknown_key_in_variant_section(config):
    config.attention.dense.block_size = 64
    with pytest.raises(ValueError, match=r"config\.attention\.dense\.block_size.*'implementation'"):
        config_lib.validate(config)


def test_missing_key(config):
    del config.model.rope_theta
    with pytest.raises(ValueError, match=r"missing key\(s\) config\.model\.rope_theta"):
        config_lib.validate(config)


def replace_model(config, **values):
    """Rebuild config.model as a fresh ConfigDict (ConfigDict itself refuses type changes on assignment)."""
    model = config.model.to_dict()
    model.update(values)
    config.model = ml_collections.ConfigDict(model)


@pytest.mark.parametrize("key, value, message", [
    ("d_model", "wide", r"config\.model\.d_model = 'wide' must be an int, got str"),
    ("num_layers", 2.5, r"config\.model\.num_layers = 2\.5 must be an int, got float"),
    ("tie_embeddings", 1, r"config\.model\.tie_embeddings = 1 must be a bool"),
    ("rope_theta", "1e4", r"config\.model\.rope_theta = '1e4' must be a float"),
    ("dtype", 16, r"config\.model\.dtype = 16 must be a str"),
])
def test_wrong_type(config, key, value, message):
    replace_model(config, **{key: value})
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_none_is_accepted_only_where_the_default_is_none(config):
    """None is the value of an unset placeholder (data.max_documents, data.sentencepiece_model, workdir);
    anywhere else it is a wrong type, named like any other."""
    config.data.max_documents = None
    config_lib.validate(config)
    config.seed = None
    with pytest.raises(ValueError, match=r"config\.seed = None must be an int, got NoneType"):
        config_lib.validate(config)
    config.seed = 0
    config.model.d_model = None
    with pytest.raises(ValueError, match=r"config\.model\.d_model = None must be an int, got NoneType"):
        config_lib.validate(config)


def test_int_accepted_for_float(config):
    replace_model(config, rope_theta=10000)
    config_lib.validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("dtype", "bf16", r"config\.model\.dtype = 'bf16'; valid choices: \['bfloat16', 'float16', 'float32'\]"),
    ("param_dtype", "bfloat16", r"config\.model\.param_dtype = 'bfloat16'; valid choices: \['float32'\]"),
    ("remat", "some", r"config\.model\.remat = 'some'; valid choices: \['none', 'full', 'dots', 'dots_attention'\]"),
    ("num_kv_heads", 3, r"num_heads = 4 is not a multiple of config\.model\.num_kv_heads = 3; valid num_kv_heads: "
                        r"divisors of 4: \[1, 2, 4\]"),
    ("head_dim", 33, r"config\.model\.head_dim = 33 must be even"),
    ("num_layers", 0, r"config\.model\.num_layers = 0 must be > 0"),
    ("norm_eps", -1.0, r"config\.model\.norm_eps = -1\.0 must be > 0"),
])
def test_bad_model_values(config, key, value, message):
    config.model[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_bad_attention_kind(config):
    config.attention.kind = "flash"
    with pytest.raises(ValueError, match=r"config\.attention\.kind = 'flash'; valid choices: \[.*'dense'.*\]"):
        config_lib.validate(config)


def test_bad_dense_implementation(config):
    config.attention.dense.implementation = "triton"
    with pytest.raises(ValueError, match=r"implementation = 'triton'; valid choices: \['auto', 'cudnn', 'xla'\]"):
        config_lib.validate(config)


def test_cudnn_needs_half_precision(config):
    config.attention.dense.implementation = "cudnn"
    with pytest.raises(ValueError, match=r"'cudnn' needs config\.model\.dtype in \['bfloat16', 'float16'\], got 'float32'"):
        config_lib.validate(config)


def test_mesh_product_must_match_devices(config):
    common.update(config.mesh, data=2, fsdp=2, sequence=1, tensor=1)
    config_lib.validate(config, num_devices=4)
    with pytest.raises(ValueError, match=r"the axes multiply to 4 but there are 8 devices"):
        config_lib.validate(config, num_devices=8)


def test_mesh_minus_one_twice(config):
    common.update(config.mesh, data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"-1 may be used for at most one axis, got it for \['data', 'fsdp'\]"):
        config_lib.validate(config)


def test_mesh_minus_one_must_divide(config):
    common.update(config.mesh, data=3, fsdp=-1)
    with pytest.raises(ValueError, match=r"fixed axes multiply to 3, which does not divide the 8 devices"):
        config_lib.validate(config, num_devices=8)


def test_bad_mesh_size(config):
    config.mesh.tensor = 0
    with pytest.raises(ValueError, match=r"config\.mesh\.tensor = 0 must be a positive int or -1"):
        config_lib.validate(config)


@pytest.mark.parametrize("mesh, message", [
    (dict(fsdp=1, tensor=8), r"config\.model\.num_heads = 4 is not divisible by 8.*\('tensor',\)"),
    (dict(fsdp=1, data=1, sequence=8), r"config\.data\.seq_len = 256 is not divisible by 8"),
])
def test_shapes_must_divide_over_the_mesh(config, mesh, message):
    common.update(config.mesh, **{"data": 1, "sequence": 1, "tensor": 1, **mesh})
    if "sequence" in mesh:
        config.data.seq_len = 260
        message = message.replace("256", "260")
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config, num_devices=8)


def test_context_parallelism_needs_the_sequence_rule(config):
    common.update(config.mesh, data=1, fsdp=1, sequence=8, tensor=1)
    config.data.seq_len = 2048                       # zigzag over 8 shards of 128-blocks
    config_lib.validate(config, num_devices=8)
    config.sharding_rules.sequence = ()
    with pytest.raises(ValueError, match=r"sharding_rules\.sequence = \(\) with config\.mesh\.sequence = 8: context"):
        config_lib.validate(config, num_devices=8)


def test_batch_must_divide_over_data_and_fsdp(config):
    config.data.global_batch_size = 12
    with pytest.raises(ValueError, match=r"global_batch_size / config\.train\.grad_accum_steps = 12 is not divisible "
                                         r"by 8.*\('data', 'fsdp'\)"):
        config_lib.validate(config, num_devices=8)


def test_bad_sharding_rule(config):
    config.sharding_rules.heads = ("model",)
    with pytest.raises(ValueError, match=r"sharding_rules\.heads = \('model',\): must be a tuple of mesh axes from "
                                         r"\['data', 'fsdp', 'sequence', 'tensor'\]"):
        config_lib.validate(config)


def test_section_validators_run(config):
    config.data.tokenizer = "words"
    with pytest.raises(ValueError, match=r"data\.tokenizer='words'"):
        config_lib.validate(config)
    config.data.tokenizer = "byte"
    config.train.warmup_steps = config.train.num_steps + 1
    with pytest.raises(ValueError, match=r"warmup_steps"):
        config_lib.validate(config)
    config.train.warmup_steps = 0
    config.parallel.context_scheme = "tree"
    with pytest.raises(ValueError, match=r"config\.parallel\.context_scheme = 'tree'; valid choices"):
        config_lib.validate(config)


def test_vocab_must_cover_the_tokenizer(config):
    config.model.vocab_size = 200
    with pytest.raises(ValueError, match=r"vocab_size=200 is smaller than the vocabulary"):
        config_lib.validate(config)


def test_common_update_refuses_unknown_keys(config):
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['d_modle'\]"):
        common.update(config.model, d_modle=3)

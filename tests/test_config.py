"""streamtune.config: loading, overrides, validation (every problem at once), sizes, help."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamtune import config
from streamtune.errors import ConfigError, InputError


def _problems(exc_info) -> str:
    return "\n".join(exc_info.value.problems)


def test_load_applies_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "data": {"path": "d.jsonl"}}))
    cfg = config.load(path, ["train.lr=1e-4", "lora.targets=[q_proj,v_proj]", "train.max_steps=7",
                             "output.overwrite=true", "memory.gpu_budget=24GiB"])
    assert cfg.model.name == "tiny-llama"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == 7 and cfg.output.overwrite is True
    assert config.parse_bytes(cfg.memory.gpu_budget) == 24 * 2**30


def test_contract_keys_exist():
    cfg = config.RunConfig()
    for dotted in ("model.name", "data.path", "data.format", "lora.rank", "lora.targets", "train.max_steps",
                   "train.lr", "data.seq_len", "train.batch_size", "train.grad_accum", "memory.gpu_budget",
                   "memory.codec", "output.dir"):
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "tiny-gemma4", "colour": "red"},
        "data": {"path": "x.jsonl", "format": "csv", "seq_len": 2},
        "train": {"lr": "fast", "max_steps": 0},
        "memory": {"codec": "zip", "gpu_budget": "lots"},
        "extra": {},
    }))
    with pytest.raises(ConfigError) as exc_info:
        config.load(path)
    text = _problems(exc_info)
    for key in ("model.colour", "data.format", "data.seq_len", "train.lr", "train.max_steps", "memory.codec",
                "memory.gpu_budget", "extra: unknown section"):
        assert key in text, key
    assert len(exc_info.value.problems) >= 8
    assert isinstance(exc_info.value, InputError) and exc_info.value.exit_code == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(scalar)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["lr=3"])


def test_required_keys():
    with pytest.raises(ConfigError) as exc_info:
        config.from_dict({"model": {"name": ""}, "data": {"path": ""}})
    assert "model.name: required" in _problems(exc_info)
    assert "data.path: required" in _problems(exc_info)


def test_lora_targets_validation():
    with pytest.raises(ConfigError, match="lora.targets"):
        config.from_dict({"data": {"path": "x"}, "lora": {"targets": "everything"}})
    with pytest.raises(ConfigError, match="lora.targets: empty list"):
        config.from_dict({"data": {"path": "x"}, "lora": {"targets": []}})


def test_relative_data_path_resolves_against_yaml_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("{}\n")
    path = tmp_path / "sub" / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "d.jsonl"}}))
    cfg = config.load(path)
    assert cfg.data.path == str(tmp_path / "sub" / "d.jsonl")


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("22GB", 22 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)), (4096, 4096),
    ("25769803776B", 24 * 2**30),
])
def test_parse_bytes(text, expected):
    assert config.parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="not a size"):
        config.parse_bytes("24 potatoes")


def test_save_round_trip(tmp_path):
    cfg = config.load(None, ["data.path=x.jsonl", "train.lr=0.01", "lora.targets=[q_proj]"])
    cfg.save(tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_help_lines_cover_every_key():
    lines = config.help_lines()
    for section, cls in config._SECTION_CLASSES.items():
        for f in config.dataclasses.fields(cls):
            assert any(line.startswith(f"{section}.{f.name} ") for line in lines), f.name
    assert all(": " in line and len(line.split(": ", 1)[1]) > 5 for line in lines)


def test_readme_documents_every_key_and_ci_runs_its_test_command():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    for line in config.help_lines():
        assert f"`{line.split(' ')[0]}`" in readme, line
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert blocks[0].endswith("streamtune train examples/quickstart.yaml") and "pip install torch==2.13.0" in blocks[0]
    test_command = blocks[1].split("&&")[-1].strip()
    ci = (repo / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci and ci.strip().splitlines()[-1] == test_command


def test_lora_dropout_with_fused_parameters_is_refused():
    from streamtune.config import from_dict
    from streamtune.errors import ConfigError

    raw = {"data": {"path": "x.jsonl"}, "lora": {"dropout": 0.1, "target_parameters": ["experts.down_proj"]}}
    with pytest.raises(ConfigError, match="lora.dropout: must be 0 with lora.target_parameters"):
        from_dict(raw)


def test_data_fields_mapping_validated():
    cfg = config.from_dict({"data": {"path": "d.jsonl", "format": "sharegpt",
                                     "fields": {"instruction": "question", "output": "answer"}}})
    assert cfg.data.fields == {"instruction": "question", "output": "answer"} and cfg.data.format == "sharegpt"
    cfg = config.load(None, ["data.path=d.jsonl", "data.fields={instruction: q, output: a}"])
    assert cfg.data.fields == {"instruction": "q", "output": "a"}
    with pytest.raises(ConfigError) as exc_info:
        config.from_dict({"data": {"path": "d.jsonl", "fields": {"instrucion": "q", "output": "q", "input": ""}}})
    text = _problems(exc_info)
    assert "data.fields: unknown target 'instrucion' (did you mean 'instruction'?); allowed: instruction, input" in text
    assert "data.fields: record key 'q' is mapped to several targets" in text
    assert "data.fields.input: '' must be the name of a record key" in text
    with pytest.raises(ConfigError, match=r"data\.fields: \['a'\] is not a valid dict"):
        config.from_dict({"data": {"path": "d.jsonl", "fields": ["a"]}})


@pytest.mark.parametrize("text, hint", [("24", "did you mean 24GiB?"), ("0.9", "fractions of the GPU are not accepted"),
                                        ("25769803776", "a byte count needs B: 25769803776B")])
def test_size_without_unit_is_refused_with_the_accepted_forms(text, hint):
    with pytest.raises(ValueError) as exc_info:
        config.parse_bytes(text)
    message = str(exc_info.value)
    assert message.startswith(f"{text!r} has no unit") and hint in message
    assert "24GiB (GiB = 2^30 bytes), 22GB (10^9 bytes)" in message and "25769803776B" in message
    with pytest.raises(ConfigError, match=r"memory\.gpu_budget: '24' has no unit"):
        config.load(None, ["data.path=d.jsonl", "memory.gpu_budget=24"])
    with pytest.raises(ConfigError, match=r"memory\.host_budget: '64' has no unit"):
        config.from_dict({"data": {"path": "d.jsonl"}, "memory": {"host_budget": 64}})


def test_did_you_mean_for_keys_sections_values_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"trian": {}, "train": {"max_step": 3, "codec": "int8"},
                                    "data": {"path": "d.jsonl", "format": "alpca"}}))
    with pytest.raises(ConfigError) as exc_info:
        config.load(path, ["lora.rnak=8"])
    text = _problems(exc_info)
    assert "trian: unknown section (did you mean 'train'?)" in text
    assert "train.max_step: unknown key (did you mean 'train.max_steps'?)" in text
    assert "train.codec: unknown key (did you mean 'memory.codec'?)" in text
    assert "lora.rnak: unknown key (did you mean 'lora.rank'?)" in text
    assert "data.format: 'alpca' is not allowed (did you mean 'alpaca'?)" in text
    with pytest.raises(ConfigError, match=r"lr=1e-4: overrides look like section\.key=value, e\.g\. train\.lr=1e-4 "
                                          r"\(did you mean train\.lr=1e-4\?\)"):
        config.load(None, ["data.path=d.jsonl", "lr=1e-4"])


def test_paths_are_stored_absolute_against_the_launch_directory(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "conf" / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "ckpt", "tokenizer": "ckpt"}, "data": {"path": "d.jsonl"},
                                    "memory": {"cache_dir": "~/packs"}, "output": {"dir": "runs/a"}}))
    cfg = config.load(path, ["data.eval_path=e.jsonl"])
    assert cfg.model.name == str(tmp_path / "ckpt") and cfg.model.tokenizer == str(tmp_path / "ckpt")
    assert cfg.data.path == str(tmp_path / "d.jsonl") and cfg.data.eval_path == str(tmp_path / "e.jsonl")
    assert cfg.output.dir == str(tmp_path / "runs" / "a")
    from pathlib import Path

    assert cfg.memory.cache_dir == str(Path("~/packs").expanduser())
    assert config.load(None, ["data.path=d.jsonl", "model.name=tiny-gemma4"]).model.name == "tiny-gemma4"
    assert config.load(None, ["data.path=d.jsonl", "model.name=org/missing"]).model.name == "org/missing"
    cfg.save(tmp_path / "saved.yaml")
    monkeypatch.chdir(tmp_path / "conf")
    again = config.load(tmp_path / "saved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_compile_layers_needs_the_fast_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "data": {"path": "d.jsonl"}}))
    assert config.load(path, ["train.compile_layers=true"]).train.compile_layers is True
    with pytest.raises(ConfigError) as exc_info:
        config.load(path, ["train.compile_layers=true", "train.kernels=eager"])
    assert "train.compile_layers" in _problems(exc_info) and "train.kernels=auto" in _problems(exc_info)


def test_an_optional_switch_takes_auto_and_a_wrong_value_names_the_choices():
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-gemma4.yaml"
    assert config.load(example, ["train.compile_layers=auto"]).train.compile_layers is None
    with pytest.raises(ConfigError, match=r"train\.compile_layers: 'sometimes' is not true, false or auto"):
        config.load(example, ["train.compile_layers=sometimes"])
    with pytest.raises(ConfigError, match=r"output\.progress: 'sometimes' is not true or false"):
        config.load(example, ["output.progress=sometimes"])


def test_dist_backend_choices_and_nccl_on_the_cpu_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "data": {"path": "d.jsonl"}}))
    assert config.load(path).train.dist_backend == "auto"
    assert config.load(path, ["train.dist_backend=gloo", "train.device=cuda"]).train.dist_backend == "gloo"
    with pytest.raises(ConfigError, match=r"train\.dist_backend: 'mpi' is not allowed; allowed: auto, nccl, gloo"):
        config.load(path, ["train.dist_backend=mpi"])
    with pytest.raises(ConfigError, match=r"train\.dist_backend: nccl needs train\.device cuda or auto"):
        config.load(path, ["train.dist_backend=nccl", "train.device=cpu"])

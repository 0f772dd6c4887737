"""``streamtune merge ADAPTER_DIR --out DIR`` on a run's adapter."""

from __future__ import annotations

import torch
import yaml

from streamtune.cli import main


def test_merge_cli_on_a_trained_run(tmp_path, run_dict, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(tmp_path / "run", train={"max_steps": 2, "lr": 1e-2})))
    assert main(["train", str(cfg)]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "merged checkpoint" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "base")), str(adapter))
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--overwrite"]) == 0


def test_merge_cli_bad_adapter_dir(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err

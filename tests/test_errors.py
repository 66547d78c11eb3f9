"""Bad input: one line on stderr with a hint, exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from vramplan.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["estimate", "--model", "lama-2-7b"], "did you mean llama-2-7b"),
    (["estimate", "--model", "7b", "--gpu", "rtx4000"], "did you mean"),
    (["estimate", "--model", "7b", "--batch", "0"], "--batch must be a positive integer"),
    (["estimate", "--model", "7b", "--seq", "-5"], "--seq must be a positive integer"),
    (["estimate", "--model", "7b", "--rank", "9000"], "rank 9000 is larger"),
    (["estimate", "--model", "7b", "--method", "lora", "--gpu", "v100-32gb", "--precision", "bf16"], "no bf16"),
    (["estimate", "--model", "7b", "--method", "dpo", "--adapter", "nope"], "unknown adapter"),
    (["estimate", "--model", "7b", "--method", "lorra"], "did you mean lora"),
    (["estimate", "--model", "7b", "--targets", "q_prj"], "did you mean q_proj"),
    (["estimate", "--model", "7b", "--gpu-mem", "lots"], "cannot read size"),
    (["fit", "--model", "7b"], "fit needs a GPU"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_malformed_config_json(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{ not json")
    assert main(["estimate", "--model", str(bad)]) == 2
    assert "malformed config.json" in capsys.readouterr().err
    missing = tmp_path / "m2"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["estimate", "--model", str(missing)]) == 2
    assert "has no num_attention_heads" in capsys.readouterr().err


def test_local_config_json_is_planned(tmp_path, capsys):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
           "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["estimate", "--model", str(tmp_path), "--method", "lora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 1_100_048_384  # TinyLlama-1.1B's shapes


def test_argparse_errors_exit_2():
    assert main(["estimate"]) == 2  # --model missing


def test_planning_path_imports_no_torch():
    code = ("import sys, vramplan; vramplan.fit('13b', 'rtx4000ada'); vramplan.estimate('7b', 'qlora'); "
            "print(','.join(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_fit_runs_in_subprocess():
    out = subprocess.run([sys.executable, "-m", "vramplan", "fit", "--model", "13b", "--gpu", "rtx4000ada"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for m in ("full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"):
        assert m in out.stdout

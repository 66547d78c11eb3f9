"""Hostile input (issue #16) and the units/hints of issue #15 item 4: one line, exit 2, nothing left behind."""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path

import pytest

import vramplan
from vramplan import validate
from vramplan.cli import main
from vramplan.errors import LockError, VramplanError, WriteError
from vramplan.units import GIB


def _one_line_error(capsys, argv, needle=None):
    assert main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    if needle:
        assert needle in err[0], err[0]
    return err[0]


# -- issue #15 item 4: units and hints ------------------------------------------------------------

def test_gpu_mem_bare_number_is_gb_of_a_card(capsys):
    assert main(["estimate", "--model", "7b", "--gpu-mem", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["capacity_bytes"] == 24 * GIB
    _one_line_error(capsys, ["estimate", "--model", "7b", "--gpu-mem", "25769803776"], "larger than 1 PiB")


def test_seq_takes_k_suffixes(capsys):
    assert main(["estimate", "--model", "7b", "--seq", "4k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["seq"] == 4096
    assert main(["matrix", "--models", "7b", "--methods", "lora", "--gpus", "rtx4090", "--seq", "1k,4k", "--json"]) == 0
    assert sorted({c["seq"] for c in json.loads(capsys.readouterr().out)["cells"]}) == [1024, 4096]


def test_argparse_errors_are_one_line(capsys):
    line = _one_line_error(capsys, ["estimate", "--model", "7b", "--seq", "x"], "--seq must be a whole number")
    assert line.startswith("vramplan estimate: error:") and "--help" in line
    _one_line_error(capsys, ["estimate", "--model", "7b", "--bogus"], "unrecognized arguments")
    _one_line_error(capsys, ["nope"], "invalid choice")
    _one_line_error(capsys, ["estimate", "--model", "7b", "--dropout", "nan"], "finite")


def test_enum_errors_list_valid_values(capsys):
    line = _one_line_error(capsys, ["estimate", "--model", "7b", "--precision", "fp16"], "did you mean fp16-mixed")
    assert "valid: bf16, bf16-mixed, fp16-mixed, fp32" in line
    assert "valid: eager, sdpa, flash" in _one_line_error(capsys, ["fit", "--model", "7b", "--gpu", "rtx4090",
                                                                   "--attn", "xformers"])
    assert "adamw_8bit" in _one_line_error(capsys, ["estimate", "--model", "7b", "--optimizer", "lion"])


def test_seq_beyond_context_warns(capsys):
    with pytest.warns(validate.ContextWarning, match="beyond llama-2-7b's context of 4,096"):
        est = vramplan.estimate("7b", seq=8192)
    assert "beyond" in est.assumptions[0]
    assert main(["estimate", "--model", "7b", "--seq", "8k"]) == 0
    assert "vramplan: warning: --seq 8,192 is beyond" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vramplan {vramplan.__version__}"


def test_install_hint_names_the_checkout():
    from vramplan.errors import install_hint

    hint = install_hint("dryrun")
    assert "pip install -e" in hint and "[dryrun]" in hint  # the tests run from a source checkout


def test_pyyaml_is_a_dependency():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "pyyaml" in deps


# -- API: only VramplanError -----------------------------------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    (dict(grad_ckpt="false"), "grad_ckpt must be True or False"),
    (dict(framework=None), "framework"),
    (dict(seq=10**400), "at most"),
    (dict(dropout=2.0), "--dropout"),
    (dict(alpha=float("nan")), "finite"),
    (dict(batch=2.0), "positive integer"),
    (dict(epochs=float("inf"), tokens="1B", gpu="rtx4090"), "--epochs"),
    (dict(epochs=-1, tokens="1B", gpu="rtx4090"), "--epochs"),
    (dict(global_batch=8, batch=0), "--batch"),
    (dict(gpu_mem=float("nan")), "finite"),
    (dict(tokens="1e400"), "--tokens"),
    (dict(techniques=5), "techniques"),
])
def test_api_raises_vramplan_error(kw, needle):
    with pytest.raises(VramplanError, match=needle.replace("(", r"\(")):
        vramplan.estimate("7b", "lora", **kw)


@pytest.mark.parametrize("kw", [dict(seq=0), dict(attn="xformers"), dict(optimizer="lion"), dict(margin=float("nan")),
                                dict(top=0), dict(gpus=10**30)])
def test_fit_refuses_bad_values_before_searching(kw):
    with pytest.raises(VramplanError):
        vramplan.fit("7b", "rtx4090", **kw)


# -- files -----------------------------------------------------------------------------------------

def _cfg(tmp_path, name, text):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(text) if isinstance(text, str) else (d / "config.json").write_bytes(text)
    return str(d)


GOOD = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 1000}


@pytest.mark.parametrize("name, text, needle", [
    ("nan", json.dumps(GOOD)[:-1] + ', "hidden_size": NaN}', "NaN is not valid JSON"),
    ("inf", json.dumps(GOOD)[:-1] + ', "vocab_size": Infinity}', "Infinity"),
    ("str", json.dumps({**GOOD, "hidden_size": "256"}), "hidden_size must be a positive integer"),
    ("list", json.dumps({**GOOD, "num_hidden_layers": [2]}), "num_hidden_layers must be a positive integer"),
    ("huge", json.dumps(GOOD)[:-1] + ', "vocab_size": 1' + "0" * 400 + "}", "vocab_size"),
    ("arch", json.dumps({**GOOD, "architectures": 5}), "architectures must be a list"),
    ("text", json.dumps({k: v for k, v in GOOD.items() if k != "hidden_size"} | {"text_config": "x"}), "text_config"),
    ("kv0", json.dumps({**GOOD, "num_key_value_heads": 0}), "num_key_value_heads must be a positive integer"),
    ("utf16", json.dumps(GOOD).encode("utf-16"), "UTF-16 text, not UTF-8"),
    ("latin1", b'{"model_type": "llam\xe9"}', "not UTF-8"),
    ("deep", "[" * 100_000 + "]" * 100_000, "nested"),
    ("binary", bytes(range(256)), "binary"),
])
def test_malformed_config_json_is_one_line(tmp_path, capsys, name, text, needle):
    _one_line_error(capsys, ["estimate", "--model", _cfg(tmp_path, name, text)], needle)


def test_model_path_to_a_binary_or_special_file(capsys):
    if Path("/bin/ls").exists():
        _one_line_error(capsys, ["estimate", "--model", "/bin/ls"], "binary")
    _one_line_error(capsys, ["estimate", "--model", "/dev/zero"], "not a regular file")


def test_oversized_file_refused(tmp_path, capsys):
    big = tmp_path / "config.json"
    big.write_text('{"x": "' + "a" * (validate.MAX_TEXT_BYTES + 10) + '"}')
    _one_line_error(capsys, ["estimate", "--model", str(big)], "too large")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_preamble_fifo_and_dev_zero_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = ["matrix", "--models", "7b", "--methods", "lora", "--gpus", "rtx4090", "--out", str(tmp_path / "o")]
    _one_line_error(capsys, base + ["--preamble", str(fifo)], "not a regular file")
    _one_line_error(capsys, base + ["--preamble", "/dev/zero"], "not a regular file")


def test_yaml_alias_bomb_refused(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines + ["base_model: 7b", "micro_batch_size: 1", "lora_target_modules: *i"]) + "\n")
    assert len(p.read_bytes()) < 700
    _one_line_error(capsys, ["estimate", "--config", str(p)], "alias")


@pytest.mark.parametrize("extra, needle", [
    ("lora_r: null\n", None), ("lora_alpha: abc\n", "lora_alpha must be a number"),
    ("lora_dropout: 2\n", "lora_dropout"), ("sequence_len: .inf\n", "sequence_len"),
    ("lora_target_modules: '(a+)+$'\n", "too complex"), ("lora_target_modules: '(.*a){25}'\n", "too complex"),
    ("lora_target_modules: 5\n", "target_modules"), ("base_model: [1, 2]\n", "base_model"),
    ("micro_batch_size: '8'\n", "micro_batch_size"),
])
def test_axolotl_wrong_value_types(tmp_path, capsys, extra, needle):
    p = tmp_path / "ax.yaml"
    p.write_text("base_model: 7b\nmicro_batch_size: 1\nsequence_len: 512\nadapter: lora\n" + extra)
    if needle is None:
        assert main(["estimate", "--config", str(p)]) == 0  # lora_r: null -> the default rank
        return
    _one_line_error(capsys, ["estimate", "--config", str(p)], needle)


@pytest.mark.parametrize("extra, needle", [({"lora_r": None}, None), ({"lora_alpha": "abc"}, "lora_alpha"),
                                           ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size")])
def test_trl_wrong_value_types(tmp_path, capsys, extra, needle):
    p = tmp_path / "trl.json"
    p.write_text(json.dumps({"model_name_or_path": "7b", "per_device_train_batch_size": 1, "use_peft": True, **extra}))
    if needle is None:
        assert main(["estimate", "--config", str(p)]) == 0
        return
    _one_line_error(capsys, ["estimate", "--config", str(p)], needle)


def test_target_regex_matches_as_peft_and_is_bounded():
    from vramplan.integrations.request import normalise_targets

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert normalise_targets(r".*\.(q_proj|v_proj)", names, []) == "q_proj,v_proj"
    assert normalise_targets(r"model\.layers\.\d+\.self_attn\.(q|k)_proj", names, []) == "q_proj,k_proj"
    t0 = time.process_time()
    for bomb in ["(a+)+$", "(a|a)*b", "(a|aa)+c", r"(\w+\s?)*$", "(.*)*x", ".*.*.*.*.*x", r"(x)\1", "(a?){30}a{30}",
                 "(a|b|ab)*c", "(?:x+x+)+y", "a" * 300]:
        with pytest.raises(VramplanError, match="too complex|unbounded repeats|too long"):
            validate.target_regex(bomb)
    with pytest.raises(VramplanError, match="too complex"):
        normalise_targets("(q_proj|v_proj)+", names, [])
    assert time.process_time() - t0 < 30  # generous: refusals are instant, a blow-up would run for hours


# -- grids -----------------------------------------------------------------------------------------

def test_matrix_grid_bound_says_how_big(capsys):
    seqs = ",".join(str(i) for i in range(1, 60))
    line = _one_line_error(capsys, ["matrix", "--models", "all", "--gpus", "all", "--seq", seqs], "cells")
    assert "narrow" in line
    _one_line_error(capsys, ["matrix", "--seq", ",".join(str(i) for i in range(1, 100))], "the limit is 64")


# -- outputs: never outside --out, never over an input, atomic --------------------------------------

def test_matrix_name_cannot_leave_out(tmp_path, capsys):
    out = tmp_path / "out"
    for bad in ("../x", "a/b", "..", ".hidden", "/abs"):
        _one_line_error(capsys, ["matrix", "--models", "7b", "--methods", "lora", "--gpus", "rtx4090", "--out", str(out),
                                 "--name", bad], "--name")
    assert not (tmp_path / "x.md").exists()
    with pytest.raises(VramplanError):
        from vramplan.matrix import feasibility_matrix, write_reports

        write_reports(feasibility_matrix("7b", "lora", "rtx4090"), out, "md", "../escape")
    assert not (tmp_path / "escape.md").exists()


def test_json_output_never_holds_nan(monkeypatch, capsys):
    import vramplan.plan as plan

    real = plan.estimate

    def nan_estimate(*a, **k):
        est = real(*a, **k)
        est.peak_bytes = float("nan")
        return est

    monkeypatch.setattr(plan, "estimate", nan_estimate)
    _one_line_error(capsys, ["estimate", "--model", "7b", "--json"], "non-finite")


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "p.json"
    target.write_text("old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(validate.os, "write", full)
    with pytest.raises(WriteError, match=r"cannot write file .*p\.json: No space left on device; free some disk"):
        validate.atomic_write(target, "new")
    monkeypatch.undo()
    monkeypatch.setattr(validate.os, "replace", full)
    with pytest.raises(WriteError):
        validate.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


# -- calibration logs and profiles ---------------------------------------------------------------

import test_calibration_fit as _tcf  # noqa: E402  (the synthetic calibration run, built once per module)

calibrated = _tcf.calibrated
from vramplan.calibration.__main__ import main as calib_main  # noqa: E402


def test_fit_only_never_overwrites_its_log(calibrated, tmp_path, capsys):
    log = tmp_path / "mylog.json"  # a log named .json: the profile used to replace it
    raw = calibrated.log_path.read_bytes()
    log.write_bytes(raw)
    assert calib_main(["--fit-only", str(log), "--no-report", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert log.read_bytes() == raw
    assert out["profile"].endswith("mylog.profile.json") and Path(out["profile"]).is_file()


def test_fit_only_disk_full_is_one_line_and_leaves_nothing(calibrated, tmp_path, capsys, monkeypatch):
    log = tmp_path / "gpu.jsonl"
    log.write_bytes(calibrated.log_path.read_bytes())
    prof = tmp_path / "gpu.json"
    prof.write_text("previous profile")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(validate.os, "write", full)
    assert calib_main(["--fit-only", str(log), "--report-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and str(prof) in err
    assert prof.read_text() == "previous profile"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_fit_only_read_only_dir_is_one_line(calibrated, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    log = ro / "gpu.jsonl"
    log.write_bytes(calibrated.log_path.read_bytes())
    os.chmod(ro, 0o555)
    try:
        assert calib_main(["--fit-only", str(log), "--no-report"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "cannot write profile" in err
        assert sorted(p.name for p in ro.iterdir()) == ["gpu.jsonl"]
    finally:
        os.chmod(ro, 0o755)


def test_read_only_profile_write_simulated(calibrated, tmp_path, monkeypatch):
    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(validate.os, "open", ro)
    with pytest.raises(WriteError, match="Read-only file system; the file system is read-only"):
        calibrated.profile.save(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_one_writer_per_calibration_log(tmp_path):
    from vramplan.calibration.log import JsonlLog

    path = tmp_path / "gpu.jsonl"
    with JsonlLog(path) as first:
        first.append({"kind": "session"})
        with pytest.raises(LockError, match="another calibration is writing"):
            JsonlLog(path).open()
    with JsonlLog(path) as again:  # released on close
        again.append({"kind": "session"})
    assert len(path.read_text().splitlines()) == 2


def test_log_append_disk_full_is_one_line(tmp_path, monkeypatch):
    from vramplan.calibration import log as logmod

    path = tmp_path / "gpu.jsonl"
    lg = logmod.JsonlLog(path).open()
    lg.append({"kind": "session", "n": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logmod.os, "write", full)
    with pytest.raises(WriteError, match="No space left on device"):
        lg.append({"kind": "session", "n": 2})
    monkeypatch.undo()
    lg.close()
    assert [json.loads(l)["n"] for l in path.read_text().splitlines()] == [1]


def test_deeply_nested_log_line_is_one_line(tmp_path, capsys):
    log = tmp_path / "gpu.jsonl"
    log.write_text('{"kind": "point", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert calib_main(["--fit-only", str(log), "--no-report"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


# -- dry run: accumulation -------------------------------------------------------------------------

@pytest.mark.torch
def test_dryrun_traces_two_micro_batches_of_any_accumulation():
    pytest.importorskip("transformers")
    from vramplan.dryrun import dryrun

    a = dryrun("qwen2.5-0.5b", "lora", seq=64, grad_accum=4)
    b = dryrun("qwen2.5-0.5b", "lora", seq=64, grad_accum=4096)  # would take hours if every micro-batch ran
    assert a.tensor_peak_bytes == b.tensor_peak_bytes
    assert b.config.grad_accum == 4096
    assert any("2 of the 4096 micro-batches" in s for s in b.assumptions)

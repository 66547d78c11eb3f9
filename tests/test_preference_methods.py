"""The preference family as plug-ins (issue 14): ORPO, CPO, SimPO, KTO, reward models and DPO/KTO with
precomputed reference log-probs. Each is a behaviour module plus a methods.toml entry; these tests hold
their copies, loss buffers, step work, trainer-config import and plan text to TRL 1.10's trainers. The
analytic-vs-dry-run agreement (within 2%) is tests/test_dryrun_vs_analytic.py's grid (benchmarks METHODS)."""

import json

import numpy as np
import pytest

import vramplan
from vramplan.errors import VramplanError
from vramplan.methods import Role, resolve
from vramplan.methods import preference as P
from vramplan.models import get_model
from vramplan.throughput import step_work

NEW = ("orpo", "cpo", "simpo", "kto", "reward", "dpo-precomputed", "kto-precomputed")


@pytest.mark.parametrize("name", NEW)
def test_each_method_is_data_plus_a_behaviour(name):
    r = resolve(name)
    assert r.behaviour.step.startswith("vramplan.runtime.preference:")
    assert r.behaviour.takes_adapter_choice
    assert r.copies[0].role is Role.POLICY and r.copies[0].trains


def test_copies_follow_trl():
    # ORPO / CPO / SimPO: no reference at all, chosen + rejected
    for m in ("orpo", "cpo", "simpo"):
        for ad in ("lora", "full"):
            r = resolve(m, ad)
            assert [c.role for c in r.copies] == [Role.POLICY] and not r.shared_roles
            assert r.sequences_per_example == 2
    # KTO: unpaired; reference = the adapter disabled with PEFT, a frozen copy in full training
    assert resolve("kto", "lora").shared_roles == (Role.REFERENCE,)
    assert [c.role for c in resolve("kto", "full").copies] == [Role.POLICY, Role.REFERENCE]
    assert resolve("kto").sequences_per_example == 1
    # precomputed reference log-probs: no reference in the step, even in full training
    for m in ("dpo-precomputed", "kto-precomputed"):
        r = resolve(m, "full")
        assert [c.role for c in r.copies] == [Role.POLICY] and not r.shared_roles
    # reward model: the policy is a sequence classifier (one score), chosen + rejected
    r = resolve("reward", "lora")
    assert r.copies[0].head == "scalar" and r.sequences_per_example == 2
    # IA³ is planned (its fp32 feed-forward backward buffers: activations.layer_backward_transient); 4-bit bases
    # with DoRA/IA³ are not reward adapters
    assert resolve("reward", "ia3").copies[0].adapter.value == "ia3"
    with pytest.raises(VramplanError):
        resolve("reward", "qia3")


def test_loss_buffers():
    T, V = np.array([4096.0]), 1000
    # the chosen half's NLL adds its saved log-softmax output (fp32: 4 B x T/2 x V) to backward
    f_nll, b_nll = P.paired_logits_bytes(T, V, 2, "trainer", rows=2, nll=True)
    f, b = P.paired_logits_bytes(T, V, 2, "trainer", rows=2, nll=False)
    assert b_nll - b == pytest.approx(T * V * 2)
    assert b == pytest.approx(T * V * 16)  # DPO's sequence_logps backward
    assert (f_nll >= f).all()
    # more than one chosen row: the .contiguous() copy beside the log-softmax output in forward
    f2, _ = P.paired_logits_bytes(T, V, 2, "trainer", rows=4, nll=True)
    assert f2 > f_nll
    # KTO: the reference's output (fp32) and the metrics' copies; none of the reference's precomputed
    fk, bk = P.kto_logits_bytes(T, V, 2, "trainer", batch=2, reference=True)
    fp, bp = P.kto_logits_bytes(T, V, 2, "trainer", batch=2, reference=False)
    assert fk - fp == pytest.approx(T * V * 4) and bk == pytest.approx(bp)
    assert fk == pytest.approx(T * V * (4 + 4 + 4 + 2))  # logits, reference, index copies, chosen-token copy
    # short sequences: entropy_from_logits' 128-row chunk buffers are the forward peak
    fs, _ = P.kto_logits_bytes(np.array([256.0]), V, 2, "trainer", batch=2, reference=True)
    assert fs == pytest.approx(256 * V * 12 + 3 * 128 * V * 4)
    # a scalar head: the final norm's fp32 backward buffers
    assert P.scalar_head_backward_bytes(T, 64) == pytest.approx(T * 64 * 20)


def test_plans_order_as_the_trainers_do():
    spec = get_model("llama-3-8b")
    kw = dict(batch=2, seq=1024)

    def peak(method):
        return vramplan.estimate(spec, method, **kw).tensor_peak_bytes

    assert peak("orpo") > peak("simpo")          # the NLL term's buffers
    assert peak("cpo") == peak("orpo")           # the same buffers (summed vs averaged log-probs)
    from vramplan.taxonomy import Phase

    def fwd(method):
        return vramplan.estimate(spec, method, **kw).phases[Phase.FORWARD]

    assert fwd("kto") > fwd("kto-precomputed")  # the reference's output, alive through the loss
    assert peak("kto") >= peak("kto-precomputed")
    assert peak("dpo+full") > peak("dpo-precomputed+full")  # no frozen reference copy
    assert peak("reward") < peak("simpo")        # no vocabulary logits
    w_full = vramplan.estimate(spec, "reward+full", **kw).components
    w_lm = vramplan.estimate(spec, "simpo+full", **kw).components
    assert min(w_full.values()) >= 0 and sum(w_full.values()) < sum(w_lm.values())


def test_kto_step_work_counts_the_kl_forwards():
    spec = get_model("llama-3-8b")
    kto = step_work(spec, vramplan.make_config(spec, "kto", batch=2, seq=512))
    pre = step_work(spec, vramplan.make_config(spec, "kto-precomputed", batch=2, seq=512))
    sft = step_work(spec, vramplan.make_config(spec, "lora", batch=2, seq=512))
    # KTO: the training step + the policy's KL forward + the reference's KL and batch forwards
    assert kto.layer_passes == sft.layer_passes + 3
    assert pre.layer_passes == sft.layer_passes + 1
    assert float(kto.model_flops) > float(pre.model_flops) > float(sft.model_flops)


def test_kto_micro_batch_one_is_flagged():
    spec = get_model("llama-3-8b")
    one = vramplan.estimate(spec, "kto", batch=1, seq=512)
    two = vramplan.estimate(spec, "kto", batch=2, seq=512)
    assert any("refuses per_device_train_batch_size 1" in a for a in one.assumptions)
    assert not any("refuses" in a for a in two.assumptions)
    assert any("TRL 1.10" in a for a in two.assumptions)


@pytest.mark.parametrize("text,method,adapter", [
    ("base_model: meta-llama/Meta-Llama-3-8B\nadapter: qlora\nload_in_4bit: true\nrl: orpo\n", "orpo", "qlora"),
    ("base_model: meta-llama/Meta-Llama-3-8B\nadapter: lora\nrl: kto\nmicro_batch_size: 2\n", "kto", "lora"),
    ("base_model: meta-llama/Meta-Llama-3-8B\nadapter: lora\nrl: simpo\n", "simpo", "lora"),
    ("base_model: meta-llama/Meta-Llama-3-8B\nadapter: lora\nreward_model: true\n", "reward", "lora"),
])
def test_axolotl_configs(tmp_path, text, method, adapter):
    from vramplan.integrations.config_files import read_training_file as read_config

    p = tmp_path / "axolotl.yml"
    p.write_text(text)
    req = read_config(p)
    cfg = vramplan.make_config(req.model, req.method, **req.options)
    assert (cfg.method, cfg.adapter) == (method, adapter)


@pytest.mark.parametrize("data,method", [
    ({"trainer": "dpo", "precompute_ref_log_probs": True}, "dpo-precomputed"),
    ({"trainer": "dpo", "precompute_ref_log_probs": False}, "dpo"),
    ({"desirable_weight": 1.0, "undesirable_weight": 1.0, "loss_type": "kto"}, "kto"),
    ({"desirable_weight": 1.0, "loss_type": "kto", "precompute_ref_log_probs": True}, "kto-precomputed"),
    ({"cpo_alpha": 1.0, "loss_type": "sigmoid"}, "cpo"),
    ({"cpo_alpha": 0.0, "loss_type": "simpo", "simpo_gamma": 0.5}, "simpo"),
    ({"center_rewards_coefficient": 0.01}, "reward"),
])
def test_trl_config_files(tmp_path, data, method):
    from vramplan.integrations.config_files import read_training_file as read_config

    p = tmp_path / "args.json"
    p.write_text(json.dumps({"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "per_device_train_batch_size": 2,
                             **data}))
    req = read_config(p)
    assert req.method == method


def test_trl_config_objects():
    from vramplan.integrations.from_model import _method_from_args

    def make(name, **attrs):
        return type(name, (), attrs)()

    notes: list = []
    assert _method_from_args(make("ORPOConfig"), notes) == "orpo"
    assert _method_from_args(make("KTOConfig", precompute_ref_log_probs=False), notes) == "kto"
    assert _method_from_args(make("KTOConfig", precompute_ref_log_probs=True), notes) == "kto-precomputed"
    assert _method_from_args(make("DPOConfig", precompute_ref_log_probs=True), notes) == "dpo-precomputed"
    assert _method_from_args(make("CPOConfig", cpo_alpha=1.0), notes) == "cpo"
    assert _method_from_args(make("CPOConfig", cpo_alpha=0.0), notes) == "simpo"
    assert _method_from_args(make("RewardConfig"), notes) == "reward"


def test_cli_plans_them(capsys):
    from vramplan.cli import main

    for m in ("orpo", "kto+qlora", "reward+full", "dpo-precomputed"):
        assert main(["estimate", "--model", "llama-3-8b", "--method", m, "--batch", "2", "--seq", "512",
                     "--gpu", "a100-80gb", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["config"]["method"] == m.split("+")[0]
    assert main(["fit", "--model", "llama-3-8b", "--method", "orpo", "--gpu", "rtx4090", "--json"]) in (0, 1)
    capsys.readouterr()


def test_kto_searches_start_at_micro_batch_two():
    rep = vramplan.fit("llama-3-8b", "rtx4090", methods=["kto"])
    row = rep.rows[0]
    assert row.fits and row.estimate.config.batch >= 2
    from vramplan.gpus import get_gpu
    from vramplan.planner.limits import largest_micro_batch, longest_sequence

    spec = get_model("llama-3-8b")
    cfg = vramplan.make_config(spec, "kto+qlora", batch=2, seq=1024)
    card = get_gpu("rtx4090")
    assert largest_micro_batch(spec, cfg, card) >= 2
    # the longest sequence is planned at micro-batch 2, so it is shorter than SimPO's at one example of 2 rows
    assert longest_sequence(spec, cfg, card) > 0


def test_precompute_pass_is_planned_beside_the_step():
    """precompute_ref_log_probs: TRL runs the reference's no-grad forward over the dataset before the first
    step, at the training batch. Its tensors are the loaded model plus the same no-grad forward DPO's step
    runs for its held reference (full training), its device total is in --json and the assumptions, and the
    verdict holds it: a card it does not fit on is "no"."""
    import numpy as np

    from vramplan.config import make_config
    from vramplan.memory import step_terms
    from vramplan.methods.preference import precompute_pass_bytes
    from vramplan.models import get_model
    from vramplan.taxonomy import Phase
    from vramplan.verdict import Verdict

    spec = get_model("llama-3-8b").with_layers(2)
    for batch, seq in ((1, 512), (2, 1024)):
        pre = precompute_pass_bytes(spec, make_config(spec, "dpo-precomputed", adapter="full", batch=batch, seq=seq))
        ref = step_terms(spec, make_config(spec, "dpo", adapter="full", batch=batch, seq=seq)).nograd_peak
        assert pre == float(np.max(ref)) > 0
    for method in ("dpo-precomputed", "kto-precomputed"):
        est = vramplan.estimate("llama-3-8b", method, gpu="a100-80gb", batch=1, seq=1024)
        p = est.extra["precompute_pass"]
        assert est.phases[Phase.LOAD] < p["tensor_bytes"] < est.tensor_peak_bytes and p["batch"] == 1
        assert any(a.startswith("precompute pass before training") for a in est.assumptions)
        (c,) = est.constraints
        assert c.hard and c.met and c.needed_bytes == p["peak_bytes"]
        assert est.to_json()["precompute_pass"] == p
        small = vramplan.estimate("llama-3-8b", method, gpu_mem=int(p["peak_bytes"] * 0.9), batch=1, seq=1024)
        assert small.verdict is Verdict.NO and not small.fits
    assert "precompute_pass" not in vramplan.estimate("llama-3-8b", "dpo", gpu="a100-80gb").extra

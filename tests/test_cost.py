"""The step cost model (saejax/train/cost.py): counts read from the compiled step, the mesh planner,
the memory refusal, and a group's state freed before the next group starts. 8 virtual CPU devices
(tests/conftest.py), small shapes."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from saejax import chips, config as cfg, mesh as meshlib
from saejax.sae.group import GroupSpec
from saejax.train import cost, hlo, loop, optim, trainer

SITES = tuple(f"res.{i}" for i in range(8))


def _plan(T=8, d=64, width=512, batch=1024, arch="jumprelu"):
    spec = GroupSpec(arch=arch, sites=SITES[:T], d=d, width=width, sweep=(0.001, 0.003))
    hp = optim.Hyper(total_steps=100, batch_size=batch, lr=1e-3, lr_warmup=5, sparsity_warmup=30, dead_steps=20)
    return spec, hp


def test_program_collectives_are_the_compiled_steps():
    """The cost model's collective bytes are hlo.collectives of the compiled train step, in this
    process and through the subprocess on virtual devices alike: data sharding all-reduces the
    gradients (at least their design minimum), stack sharding communicates next to nothing."""
    spec, hp = _plan()
    data = {"data": 8, "stack": 1, "latent": 1}
    mesh = meshlib.make_mesh(data, jax.devices()[:8])
    tr = trainer.Trainer(spec, hp, mesh)
    st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h),
                                tr.abstract, tr.state_shardings)
    x = jax.ShapeDtypeStruct(tr.x_shape, np.float32, sharding=tr.x_sharding)
    text = tr.step.lower(st, x).compile().as_text()
    got = cost.program(spec, hp, mesh)
    assert got["collectives"] == hlo.collectives(text) and got["flops"] == hlo.flops(text)
    assert got["collectives"]["all-reduce"] >= cost.design_comm(spec, hp, data)["all-reduce"] > 0
    assert cost.measure([(spec, hp)], data, subprocess_only=True)[0]["collectives"] == got["collectives"]
    stack = cost.measure([(spec, hp)], {"data": 1, "stack": 8, "latent": 1})[0]
    assert sum(stack["collectives"].values()) < 2 ** 20 * spec.T * spec.K  # metrics and counters only
    assert stack["flops"] >= cost.shape_flops(spec, hp, {"data": 1, "stack": 8, "latent": 1})


def test_planner_picks_stack_parallel_for_small_saes():
    plans = [_plan()]
    best, table = cost.propose(plans, 8, chips.get("v5p"))
    assert best == {"data": 1, "stack": 8, "latent": 1}, table
    assert table[(8, 1, 1)][0] > table[(1, 8, 1)][0]  # data parallel all-reduces the gradients


def test_planner_shards_latents_when_one_sae_does_not_fit():
    """A chip whose memory holds less than one SAE's state (params, Adam, activations): the planner
    splits latents, and only as far as needed to fit."""
    plans = [_plan(width=8192)]
    spec, hp = plans[0]
    stack = {"data": 1, "stack": 8, "latent": 1}
    one = cost.device_bytes(cost.memory_plan(_config(), plans, stack)["groups"][spec.name]["mem"])
    assert cost.propose(plans, 8, chips.get("v5p"))[0] == stack  # fits whole: no latent sharding
    small = dataclasses.replace(chips.get("v5p"), hbm=one * 0.6)
    best, table = cost.propose(plans, 8, small)
    assert best["latent"] > 1 and table[(best["data"], best["stack"], best["latent"])][1] <= small.hbm


def _config(**over):
    c = cfg.defaults()
    c.train.source = "synthetic"
    for k, v in over.items():
        cfg.set_value(c, k, v)
    return c


def test_refusal_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    """A plan over the target chip's device memory is refused in one line naming mesh.target_chip,
    in the dry run (after printing) and before a real run compiles or writes anything; so is a harvest
    whose shuffle buffers exceed one host's memory (gemma2_2b's old 32 GiB per site: 5.1 TB)."""
    c = _config(**{"workdir": str(tmp_path), "synthetic.sites": 2, "synthetic.d": 1024,
                   "sae.widths": (2 ** 22,), "train.batch_size": 256, "mesh.data": 8, "mesh.stack": 1,
                   "mesh.latent": 1, "mesh.target_chip": "v5e"})
    cfg.validate(c)
    monkeypatch.setattr(trainer.Trainer, "init_state", lambda self: pytest.fail("a refused plan ran"))
    for dry in (False, True):
        if dry:
            monkeypatch.setattr(cost, "measure", lambda plans, sizes: [{} for _ in plans])  # no compile
        with pytest.raises(cost.PlanError, match=r"more than a v5e chip's 14.90 GiB \(mesh.target_chip\)") as e:
            loop.run(c, dry_run=dry)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "train").exists()

    from saejax import models
    from saejax.store.plan import Plan
    g = cfg.load("experiments/gemma2_2b.py", ["--config.harvest.shuffle_bytes=34359738368"])
    plan = Plan(g, models.load_shape("hf:google/gemma-2-2b"), None, 16)
    with pytest.raises(cfg.ConfigError, match=r"'harvest.shuffle_bytes'.* 5\.1 TB of shuffle buffers per process"):
        plan.check_host_memory(g)


def test_previous_group_state_is_freed_before_the_next_starts(tmp_path, monkeypatch):
    """Groups train one after another; when the next group's state is created, no device array of
    the previous group is alive (the job's peak is one group, as the dry run promises)."""
    c = _config(**{"workdir": str(tmp_path), "synthetic.sites": 2, "synthetic.d": 32,
                   "synthetic.n_features": 64, "sae.widths": (64, 128), "train.batch_size": 64,
                   "train.tokens": 64 * 4, "train.log_every": 2, "train.checkpoint_every": 2,
                   "mesh.data": 8})
    cfg.validate(c)
    live, orig = [], trainer.Trainer.init_state
    before = {id(a) for a in jax.live_arrays()}  # what earlier tests in this process left (compile caches)

    def init_state(self):
        live.append(sum(a.nbytes for a in jax.live_arrays() if id(a) not in before))
        return orig(self)

    monkeypatch.setattr(trainer.Trainer, "init_state", init_state)
    assert len(loop.run(c)) == 2
    assert live == [0, 0], live


def _two_meshes_config(workdir):
    """Two groups that the planner puts on different meshes of the 8 devices: on a chip with 4 MB
    of memory the 64-wide group trains whole SAEs (stack x data), the 4,096-wide one must split latents."""
    return _config(**{"workdir": str(workdir), "synthetic.sites": 2, "synthetic.d": 32,
                      "synthetic.n_features": 64, "sae.widths": (64, 4096), "train.batch_size": 64,
                      "train.tokens": 64 * 12, "train.log_every": 2, "train.checkpoint_every": 4,
                      "mesh.data": 8, "mesh.plan": "auto"})


def test_per_group_meshes_resume_bitwise(tmp_path, monkeypatch, capsys):
    """mesh.plan = 'auto': each group trains on its own mesh of the same 8 devices; a run preempted
    in the second group and rerun ends bitwise equal to a run never interrupted (the checkpoint
    restores into that group's mesh)."""
    monkeypatch.setitem(chips.CHIPS, "v5p", dataclasses.replace(chips.get("v5p"), hbm=4e6))
    c = _two_meshes_config(tmp_path / "a")
    cfg.validate(c)
    plans = loop.plan_groups(c, loop.make_source(c))
    meshes = cost.plan_meshes(c, plans, 8)[1]
    assert meshes[0] == {"data": 4, "stack": 2, "latent": 1} and meshes[1]["latent"] > 1, meshes
    want = loop.run(c)
    err = capsys.readouterr().err
    for (spec, _), sizes in zip(plans, meshes):
        assert f"[{spec.name}] 2 sites x {spec.K} sweep members, 12 steps of 64 tokens (768 tokens), mesh {sizes}" in err

    _preempt_second_and_resume(monkeypatch, capsys, _two_meshes_config(tmp_path / "b"), plans, want)


def test_mesh_plan_errors_are_one_line(tmp_path, monkeypatch):
    """An unknown mesh.plan is refused naming the key; with 'auto', a group no mesh of the devices
    fits is refused naming mesh.plan, before anything runs."""
    c = _config(**{"mesh.plan": "best"})
    with pytest.raises(cfg.ConfigError, match="mesh.plan"):
        cfg.validate(c)
    monkeypatch.setitem(chips.CHIPS, "v5p", dataclasses.replace(chips.get("v5p"), hbm=1e6))
    c = _two_meshes_config(tmp_path)
    cfg.validate(c)
    with pytest.raises(cost.PlanError, match=r"^mesh.plan='auto': no mesh of 8 devices splits group "
                       r"jumprelu_d32_w4096 .* \(mesh.target_chip\)$") as e:
        loop.run(c)
    assert "\n" not in str(e.value) and not (tmp_path / "train").exists()


def test_clt_step_cost_is_its_compiled_step(tmp_path, capsys):
    """A CLT (clt.enabled) in the cost model: its collective bytes and FLOPs are hlo's counts of
    CLTTrainer's compiled step (here and through the virtual-device subprocess alike), data sharding
    all-reduces at least the design minimum, and the dry run prints its cost and projection lines."""
    from saejax import models
    from saejax.sae.clt import CLTSpec
    from saejax.train.clt_step import CLTTrainer
    spec = CLTSpec(arch="jumprelu", layers=(0, 1, 2), d_in=16, d_out=16, width=64, sparsity=1e-3)
    hp = optim.Hyper(total_steps=10, batch_size=256, lr=1e-3)
    sizes = {"data": 4, "stack": 1, "latent": 2}
    tr = CLTTrainer(spec, hp, meshlib.make_mesh(sizes, jax.devices()[:8]))
    st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h),
                                tr.abstract, tr.state_shardings)
    text = tr.step.lower(st, jax.ShapeDtypeStruct(tr.x_shape, np.float32, sharding=tr.x_sharding)).compile().as_text()
    got = cost.measure([(spec, hp)], sizes)[0]
    assert got["collectives"] == hlo.collectives(text) and got["flops"] == hlo.flops(text)
    assert cost.measure([(spec, hp)], sizes, subprocess_only=True)[0]["collectives"] == got["collectives"]
    assert got["collectives"]["all-reduce"] >= cost.clt_design_comm(spec, hp, sizes)["all-reduce"] > 0
    assert got["flops"] >= cost.clt_shape_flops(spec, hp, sizes) > 0

    c = cfg.load("experiments/smollm2_clt.py:runlocal", [f"--config.workdir={tmp_path}"])
    c.sae.transcoders = (0,)  # one group beside the CLT keeps the dry run short
    shape = models.load_shape(c.model.source)
    loop.run(c, dry_run=True, planned_widths={s: int(shape.site_width(s)) for s in cfg.sites(c)})
    err = capsys.readouterr().err
    from saejax.train.clt_step import plan_clt
    from saejax.sources import PlannedSource
    cspec, chp = plan_clt(c, PlannedSource({s: int(shape.site_width(s)) for s in cfg.sites(c)}))
    csizes = {"data": 8, "stack": 1, "latent": 1}
    prog = cost.measure([(cspec, chp)], csizes)[0]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"[{cspec.name}]")]
    want = cost.clt_report(c, cspec, chp, csizes, prog)
    cut = lambda ln: ln.split(": ", 1)[1].split("TFLOP", 1)[1]  # noqa: E731 - the compile time differs
    assert [cut(ln) for ln in lines if "step cost per device" in ln] == [cut(want[0])]
    assert f"all-reduce {prog['collectives']['all-reduce'] / 2 ** 20:,.1f} MiB" in want[0]
    assert want[1] in lines and "limited by" in want[1]
    assert not (tmp_path / "train").exists()


def _clt_config(workdir, **over):
    """A transcoder group (layers 0 and 1, width 64) and a CLT over the same two layers (width 4,096)
    on synthetic pairs, planned per group on 8 devices."""
    return _config(**{"workdir": str(workdir), "synthetic.d": 32, "synthetic.n_features": 64,
                      "sae.transcoders": (0, 1), "sae.site_kinds": (), "sae.widths": (64,), "clt.enabled": True,
                      "clt.width": 4096, "train.batch_size": 64, "train.tokens": 64 * 12, "train.log_every": 2,
                      "train.checkpoint_every": 4, "mesh.data": 8, "mesh.plan": "auto", **over})


def _plans(c):
    from saejax.train import clt_step
    src = loop.make_source(c)
    return loop.plan_groups(c, src) + [clt_step.plan_clt(c, src)]


def test_planner_gives_a_clt_a_data_x_latent_mesh(tmp_path, monkeypatch):
    """The CLT is one more plan (mesh.plan = 'auto'): its candidates have stack 1; one that fits a device
    whole shards data only; on a chip too small for it whole it splits latents, and the job's peak
    counts it."""
    c = _clt_config(tmp_path)
    cfg.validate(c)
    plans = _plans(c)
    spec, hp = plans[-1]
    assert cost.is_clt(spec)
    _, table = cost.propose([plans[-1]], 8, chips.get("v5p"))
    assert {k[1] for k in table} == {1}, table
    assert cost.plan_meshes(c, plans, 8)[1][-1] == {"data": 8, "stack": 1, "latent": 1}
    monkeypatch.setitem(chips.CHIPS, "v5p", dataclasses.replace(chips.get("v5p"), hbm=4e6))
    meshes = cost.plan_meshes(c, plans, 8)[1]
    assert meshes[-1]["stack"] == 1 and meshes[-1]["latent"] > 1, meshes
    _, table = cost.propose([plans[-1]], 8, chips.get("v5p"))
    assert all(v[1] > 4e6 for k, v in table.items() if k[2] == 1) and table[cost.key(meshes[-1])][1] <= 4e6
    m = cost.memory_plan(c, plans, meshes)
    assert m["peak_group"] == spec.name and m["peak"] == cost.device_bytes(cost.memory(spec, hp, meshes[-1]))


def test_too_big_clt_is_refused_in_one_line(tmp_path, monkeypatch):
    """A CLT over the chip's memory: on the configured mesh (dry run after printing, real run before
    anything compiles or writes) refused naming clt.width and mesh.latent; with mesh.plan = 'auto'
    when no data x latent mesh fits, naming mesh.plan and clt.width."""
    from saejax.train import clt_step
    monkeypatch.setitem(chips.CHIPS, "v5p", dataclasses.replace(chips.get("v5p"), hbm=4e6))
    for cls in (trainer.Trainer, clt_step.CLTTrainer):
        monkeypatch.setattr(cls, "init_state", lambda self: pytest.fail("a refused plan ran"))
    c = _clt_config(tmp_path, **{"mesh.plan": "fixed"})
    cfg.validate(c)
    for dry in (False, True):
        if dry:
            monkeypatch.setattr(cost, "measure", lambda plans, sizes: [{} for _ in plans])  # no compile
        with pytest.raises(cost.PlanError, match=r"^mesh \{'data': 8, 'stack': 1, 'latent': 1\}: the CLT "
                           r"clt_jumprelu_L2_d32_w4096_0.001 needs .* \(mesh.latent, .*\(clt.width, clt.layers\)$") as e:
            loop.run(c, dry_run=dry)
        assert "\n" not in str(e.value)
    c = _clt_config(tmp_path, **{"clt.width": 2 ** 16})
    cfg.validate(c)
    with pytest.raises(cost.PlanError, match=r"^mesh.plan='auto': no data x latent mesh of 8 devices splits the "
                       r"CLT .* clt.width=65536.*\(clt.width, clt.layers\)$") as e:
        loop.run(c)
    assert "\n" not in str(e.value) and not (tmp_path / "train").exists()


def test_group_and_clt_on_planned_meshes_resume_bitwise(tmp_path, monkeypatch, capsys):
    """mesh.plan = 'auto': the transcoder group trains on data x stack, the CLT after it on latent
    shards of the same 8 devices; a run preempted in the CLT and rerun ends bitwise equal to one never
    interrupted."""
    monkeypatch.setitem(chips.CHIPS, "v5p", dataclasses.replace(chips.get("v5p"), hbm=4e6))
    c = _clt_config(tmp_path / "a")
    cfg.validate(c)
    plans = _plans(c)
    meshes = cost.plan_meshes(c, plans, 8)[1]
    assert meshes[0]["stack"] > 1 and meshes[1]["latent"] > 1, meshes
    want = loop.run(c)
    assert f"[{plans[1][0].name}] cross-layer transcoder over 2 layers x 4096 latents, 12 steps of 64 tokens " \
           f"(768 tokens), mesh {meshes[1]}" in capsys.readouterr().err

    _preempt_second_and_resume(monkeypatch, capsys, _clt_config(tmp_path / "b"), plans, want)


def _preempt_second_and_resume(monkeypatch, capsys, config, plans, want):
    """SIGTERM at step 6 of the second plan (a group or the CLT), then a resume: the final params and
    metrics of every plan equal ``want``'s (the uninterrupted run's final folders), bitwise."""
    class Preempt:
        made = 0

        def __init__(self):
            Preempt.made += 1
            self.at = 6 if Preempt.made == 2 else None

        def reached(self, step):
            return step == self.at

        def close(self):
            pass

    monkeypatch.setattr(loop, "PreemptionWatch", Preempt)
    with pytest.raises(loop.Preempted):
        loop.run(config)
    assert sorted(os.listdir(os.path.join(config.workdir, "train", plans[1][0].name, "checkpoints"))) == ["4", "6"]
    got = loop.run(config)
    assert "resumed from the checkpoint at step 6" in capsys.readouterr().err
    for a, b in zip(want, got):
        pa, pb = load_file(os.path.join(a, "params.safetensors")), load_file(os.path.join(b, "params.safetensors"))
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa), a
        ma, mb = (open(os.path.join(os.path.dirname(p), "metrics.jsonl")).read() for p in (a, b))
        assert ma == mb


def test_planner_pads_gemma2_2b_att_on_64_chips():
    """mesh.pad_sites='auto' at Gemma 2 2B 16k att's shapes (26 sites of d 2048, 16k latents, 5 members,
    batch 4096, bf16 matmuls) on 64 v5p chips, from shapes alone: unpadded, stack can be 1 or 2; the
    planner pads to 32 slots (stack 32) and that beats every unpadded mesh even with the idle slots'
    work counted; the reported fraction of peak counts the real sites' work only."""
    spec = GroupSpec(arch="jumprelu", sites=tuple(f"att.{i}" for i in range(26)), d=2048, width=16384,
                     sweep=(0.001,) * 5, matmul_dtype="bfloat16")
    hp = optim.Hyper(total_steps=100, batch_size=4096)
    v5p = chips.get("v5p")
    (plain,), base, base_table = cost.propose_padded([(spec, hp)], 64, v5p, 2, 16, 0)
    assert plain[0].pad == 0 and base["stack"] in (1, 2)
    (padded,), best, table = cost.propose_padded([(spec, hp)], 64, v5p, 2, 16, "auto")
    assert (padded[0].T, padded[0].pad, padded[0].n_sites) == (32, 6, 26) and best["stack"] > 2
    assert table[cost.key(best)][0] < min(t for t, peak in base_table.values() if peak <= v5p.hbm)
    r = cost.analytic(padded[0], hp, best, v5p, 2)
    full = cost.analytic(dataclasses.replace(padded[0], sites=tuple(f"att.{i}" for i in range(32)), pad=0),
                         hp, best, v5p, 2)
    assert r["serial"] == pytest.approx(full["serial"], rel=1e-3)  # idle slots cost what real sites do
    assert r["fraction"] == pytest.approx(full["fraction"] * 26 / 32, rel=1e-3)
    assert r["fraction"] > cost.analytic(spec, hp, base, v5p, 2)["fraction"]
    # An int pads to its multiple; a CLT is never padded.
    (eight,), _, _ = cost.propose_padded([(spec, hp)], 64, v5p, 2, 16, 8)
    assert eight[0].T == 32 and cost.pad_plans([(spec, hp)], 4)[0][0].T == 28

"""Exact resumption: vqtriton.checkpoint (atomic save, verified load, RNG state) and the demo killed and resumed.

A resumed run must end bitwise equal to the run that never stopped, and no kill may cost a checkpoint.
The fault-injection tests run ``vqtriton demo`` in subprocesses and SIGKILL them: at points the demo's
test-only hook ``VQTRITON_DEMO_FAULT`` lands exactly (inside a step, inside a checkpoint write: see
vqtriton/demo.py), chosen at random with a fixed seed (``VQTRITON_RESUME_TEST_SEED`` picks another), and
from outside at random moments. Runs are tiny (80 steps of 2 images, 32 codes: seconds each) and every
subprocess has a timeout.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vqtriton import checkpoint, cli, demo
from vqtriton.checkpoint import CheckpointError
from vqtriton.layer import VectorQuantizer
from vqtriton.residual import ResidualVQ

SEED = int(os.environ.get("VQTRITON_RESUME_TEST_SEED", "21"))  # the kill plan's seed, printed on failure
RUN_TIMEOUT_S = 180
# EMA codebook with dead-code restarts (they draw from torch's RNG between steps 29 and 74 at these
# settings), k-means on the first batch, checkpoints every 7 steps and at the end.
STEPS, SAVE_EVERY = 80, 7
SETTINGS = dict(codes=32, batch=2, ema=True, backend="torch", device="cpu")
SAVES = [s for s in range(1, STEPS + 1) if s % SAVE_EVERY == 0 or s == STEPS]
needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def assert_same(a, b, where="state"):
    """Bitwise equality of two states: tensors by dtype, shape and bits; everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        bits = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731 (NaN == NaN)
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


# --- vqtriton.checkpoint ---------------------------------------------------------------------------


def awkward_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(7, 13, generator=g),
        "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "t": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "idx": torch.randint(-1, 9, (11,), generator=g),
        "mask": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 5),
        "opt": {0: {"step": torch.tensor(3.0)}, 1: {}},  # int keys, as an optimizer's state
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "name": "all"}],
        "history": {"loss": [0.5, float("nan"), float("inf"), -0.0], "step": [0, 10]},
        "blob": b"\x00\xff",
        "dtype": torch.float16,
        "flag": True,
        "step": 12,
    }


def test_save_load_round_trips_bit_for_bit(tmp_path):
    path = tmp_path / "ck.pt"
    state = awkward_state()
    checkpoint.save(state, path)
    assert_same(checkpoint.load(path), state)
    plain = torch.load(path, weights_only=True)  # an ordinary torch file: the state's keys and one more
    assert list(plain) == [*state, checkpoint.HEADER] and plain["step"] == 12
    assert checkpoint.stale_temp_files(path) == []


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1])
def test_a_truncated_checkpoint_names_the_file(tmp_path, cut):
    path = tmp_path / "ck.pt"
    checkpoint.save(awkward_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut % len(data)])
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} cannot be read"):
        checkpoint.load(path)


def test_damaged_bytes_never_load_silently(tmp_path):
    """torch.load checks no checksum (most single-byte flips load with changed values); load does."""
    path = tmp_path / "ck.pt"
    state = awkward_state()
    checkpoint.save(state, path)
    data = path.read_bytes()
    # A flip inside a tensor's values: the file unpickles, the digest does not match.
    at = data.index(state["w"].numpy().tobytes()) + 37
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is damaged: its contents do not match"):
        checkpoint.load(path)
    rng = random.Random(SEED)
    refused = 0
    for _ in range(150):  # anywhere: refused, or (a byte nothing reads) the very same state
        at = rng.randrange(len(data))
        path.write_bytes(data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :])
        try:
            assert_same(checkpoint.load(path), state, f"flip at byte {at} (seed {SEED})")
        except CheckpointError as e:
            assert str(path) in str(e)
            refused += 1
    assert refused > 75


def test_foreign_files_are_refused(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"model": {}, "step": 3}, path)  # e.g. the demo's checkpoints before vqtriton.checkpoint
    with pytest.raises(CheckpointError, match="was not written by vqtriton.checkpoint.save"):
        checkpoint.load(path)
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.pt"))):
        checkpoint.load(tmp_path / "none.pt")


def test_save_refuses_what_it_cannot_load_before_writing(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save({"step": 1}, path)
    with pytest.raises(TypeError, match="state must be a dict, got list"):
        checkpoint.save([1], path)
    with pytest.raises(TypeError, match=r"state\['opt'\]\['f'\]: .* got builtin_function_or_method"):
        checkpoint.save({"opt": {"f": len}}, path)
    with pytest.raises(TypeError, match="meta"):
        checkpoint.save({"w": torch.empty(3, device="meta")}, path)
    with pytest.raises(ValueError, match="must not have the key 'vqtriton_checkpoint'"):
        checkpoint.save({checkpoint.HEADER: 1}, path)
    assert checkpoint.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


@pytest.mark.parametrize("phase", ["partial", "written"])
def test_a_write_that_fails_before_the_rename_keeps_the_previous_checkpoint(tmp_path, phase):
    path = tmp_path / "ck.pt"
    checkpoint.save({"step": 1}, path)

    def fail(at):
        if at == phase:
            raise KeyboardInterrupt(at)

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2, "w": torch.randn(1000)}, path, _hook=fail)
    assert checkpoint.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"], "the failed save left its temp file"


def test_stale_temp_files(tmp_path):
    path = tmp_path / "ck[1].pt"  # glob characters in the name
    stale = tmp_path / ".ck[1].pt.123-0a1b2c3d.tmp"
    others = [tmp_path / ".other.pt.1-00.tmp", tmp_path / "ck[1].pt.bak", tmp_path / ".ck1.pt.5-00.tmp"]
    for p in (stale, *others):
        p.write_bytes(b"x")
    checkpoint.save({"step": 1}, path)
    assert checkpoint.stale_temp_files(path) == [str(stale)]
    assert checkpoint.remove_stale_temp_files(path) == [str(stale)]
    assert not stale.exists() and all(p.exists() for p in others)
    assert checkpoint.stale_temp_files(path) == [] and checkpoint.load(path) == {"step": 1}


def draws(g: torch.Generator) -> list:
    return [torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2).tolist(), np.random.normal(),
            torch.randn(2, generator=g)]


def test_rng_state_round_trips_every_generator(tmp_path):
    g = torch.Generator().manual_seed(5)
    random.gauss(0, 1), np.random.normal()  # leave cached gaussians in both, which the state must hold too
    state = checkpoint.rng_state({"layer": g})
    first = draws(g)
    checkpoint.save({"rng": state}, tmp_path / "rng.pt")
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"], {"layer": g})
    assert_same(draws(g), first)


def test_saving_draws_no_random_number(tmp_path):
    g = torch.Generator().manual_seed(1)
    before = checkpoint.rng_state({"g": g})
    checkpoint.save({"w": torch.randn(5, generator=torch.Generator())}, tmp_path / "ck.pt")
    checkpoint.load(tmp_path / "ck.pt")
    assert_same(checkpoint.rng_state({"g": g}), before)


def test_set_rng_state_checks_its_input():
    g = torch.Generator()
    state = checkpoint.rng_state({"batches": g})
    with pytest.raises(ValueError, match=r"holds the generators \['batches'\], got \['layer'\]"):
        checkpoint.set_rng_state(state, {"layer": g})
    with pytest.raises(ValueError, match="what rng_state\\(\\) returned"):
        checkpoint.set_rng_state({"torch": torch.get_rng_state()})
    with pytest.raises(TypeError, match="generators must map names"):
        checkpoint.rng_state({"g": 3})
    with pytest.raises(TypeError, match="generators must be a dict"):
        checkpoint.rng_state([g])


@pytest.mark.gpu
def test_rng_state_holds_the_cuda_generators():
    torch.cuda.init()
    state = checkpoint.rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


# --- a layer with its own generator -------------------------------------------------------------------


def layer_loop(model, opt, g_batches, steps, noise):
    for _ in range(steps):
        z = torch.randn(7, 6, generator=g_batches).requires_grad_()  # an encoder's output, as it were
        _, _, loss = model(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.rand(noise)  # the global RNG moves differently per run: a layer with its own generator ignores it


def make_layers(kind: str, g: torch.Generator):
    kw = dict(kmeans_init=True, kmeans_iters=2, dead_code_threshold=0.5, backend="torch", generator=g)
    if kind == "vq":
        model = VectorQuantizer(6, 9, ema_decay=0.8, heads=2, **kw)
    else:
        model = ResidualVQ(6, 9, 3, quantize_dropout=0.5, **kw)  # learned codebooks restarting dead codes
    return model, torch.optim.Adam(model.parameters(), lr=1e-2) if list(model.parameters()) else None


class _NoOpt:
    def zero_grad(self):
        pass

    def step(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("kind", ["vq", "residual"])
def test_a_layer_with_its_own_generator_resumes_bitwise(tmp_path, kind):
    """The loop checkpoints the layer's generator (``generator.get_state()`` through ``rng_state``)."""

    def fresh():
        g = torch.Generator().manual_seed(11)
        model, opt = make_layers(kind, g)
        return model, opt or _NoOpt(), g, torch.Generator().manual_seed(12)

    model, opt, g, gb = fresh()
    layer_loop(model, opt, gb, 12, noise=5)
    straight = model.state_dict()

    model, opt, g, gb = fresh()
    layer_loop(model, opt, gb, 5, noise=5)
    gens = {"layer": g, "batches": gb}
    checkpoint.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": checkpoint.rng_state(gens)},
                    tmp_path / "ck.pt")
    for keep_generator in (True, False):
        model, opt, g, gb = fresh()  # a new process: new modules, generators at their seeds
        state = checkpoint.load(tmp_path / "ck.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        layer_state = g.get_state()
        checkpoint.set_rng_state(state["rng"], {"layer": g, "batches": gb})
        if not keep_generator:  # the check can fail: without the layer's generator state the run differs
            g.set_state(layer_state)
        layer_loop(model, opt, gb, 7, noise=8)
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in straight.items())
        assert same == keep_generator, f"{kind}: resumed with the generator's state: {keep_generator}"


# --- the demo, in this process ---------------------------------------------------------------------------


def run_demo(out, steps, *, resume=False, threads=1, **settings) -> dict:
    """The demo in this process, on one CPU thread (the thread count changes a CPU run's bits, and one
    thread is also the fast way on a busy 2-core machine)."""
    cfg = demo.DemoConfig(steps=steps, out=str(out), resume=resume, progress=False, save_every=SAVE_EVERY,
                          **{**SETTINGS, **settings})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        demo.train(cfg)
    finally:
        torch.set_num_threads(before)
    return checkpoint.load(os.path.join(out, demo.CHECKPOINT))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 80-step runs that never stop, by codebook kind."""
    cache = {}

    def get(ema: bool):
        if ema not in cache:
            cache[ema] = run_demo(tmp_path_factory.mktemp("straight"), STEPS, ema=ema)
        return cache[ema]

    return get


@pytest.mark.parametrize("ema, stop", [(True, 1), (True, 45), (False, 37)])
def test_a_stopped_demo_resumes_bitwise(tmp_path, uninterrupted, ema, stop):
    """Stopped after ``stop`` steps and resumed: the weights, Adam's state, every RNG state and the history
    are those of the run that never stopped. (Before vqtriton.checkpoint the demo reseeded its batch sampler
    on resume and kept no RNG state: 39 of its 53 model and optimizer tensors differed.)"""
    first = run_demo(tmp_path, stop, ema=ema)
    assert first["step"] == stop
    assert_same(run_demo(tmp_path, STEPS, resume=True, ema=ema), uninterrupted(ema))


def test_the_demo_resumes_bitwise_on_the_triton_path(tmp_path):
    """Through the interpreter here (programs run one at a time); the CUDA kernels in deterministic mode
    in the gpu test below."""
    kw = dict(backend="triton", codes=5, ema=True)
    straight = run_demo(tmp_path / "a", 4, **kw)
    run_demo(tmp_path / "b", 2, **kw)
    assert_same(run_demo(tmp_path / "b", 4, resume=True, **kw), straight)


@pytest.mark.gpu
@pytest.mark.parametrize("ema", [False, True])
def test_the_demo_resumes_bitwise_on_cuda_in_deterministic_mode(tmp_path, ema):
    kw = dict(backend="triton", device="cuda", deterministic=True, ema=ema, batch=16)
    straight = run_demo(tmp_path / "a", 30, **kw)
    run_demo(tmp_path / "b", 12, **kw)
    assert_same(run_demo(tmp_path / "b", 30, resume=True, **kw), straight)


def test_resuming_on_another_number_of_cpu_threads_warns(tmp_path):
    run_demo(tmp_path, 3, codes=4)
    with pytest.warns(UserWarning, match="with 1 CPU threads, this one has 2: .* not be bitwise"):
        run_demo(tmp_path, 4, codes=4, resume=True, threads=2)


def demo_args(out, steps=6, *extra):
    return ["demo", "--steps", str(steps), "--codes", "4", "--batch", "3", "--save-every", "3", "--backend", "torch",
            "--device", "cpu", "--out", str(out), *extra]


def test_a_damaged_checkpoint_stops_the_demo_and_stays_as_it_is(tmp_path):
    """Never a silent restart from step 0: the run stops with the file's name, and leaves the file alone."""
    path = tmp_path / "checkpoint.pt"
    assert cli.main(demo_args(tmp_path)) == 0
    data = path.read_bytes()
    state = checkpoint.load(path)
    at = data.index(state["model"]["quantizer.codebook"].numpy().tobytes())
    for damaged in (data[: len(data) // 2], data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]):
        path.write_bytes(damaged)
        with pytest.raises(SystemExit, match=f"vqtriton demo: checkpoint {re.escape(str(path))} "):
            cli.main(demo_args(tmp_path, 9, "--resume"))
        assert path.read_bytes() == damaged
    torch.save({"model": state["model"], "step": 6}, path)  # the demo's checkpoint format before this one
    with pytest.raises(SystemExit, match="was not written by vqtriton.checkpoint.save"):
        cli.main(demo_args(tmp_path, 9, "--resume"))


def test_resuming_with_other_settings_is_refused(tmp_path):
    assert cli.main(demo_args(tmp_path)) == 0
    with pytest.raises(SystemExit, match=r"other settings: codes=4 \(now 5\).*only --steps and --save-every"):
        cli.main([*demo_args(tmp_path, 9, "--resume"), "--codes", "5"])
    with pytest.raises(SystemExit, match="is at step 6, past --steps 5"):
        cli.main(demo_args(tmp_path, 5, "--resume"))
    assert cli.main(demo_args(tmp_path, 6, "--resume")) == 0  # nothing left to do: evaluates the saved model


def test_a_bad_fault_spec_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.FAULT_ENV, "step:3:sideways")
    expected = "VQTRITON_DEMO_FAULT must be one of step:N:forward|backward|update; save:N:partial|written|renamed"
    with pytest.raises(ValueError, match=re.escape(expected)):
        cli.main(demo_args(tmp_path))


# --- the demo in subprocesses, SIGKILLed ---------------------------------------------------------------


def cli_args(out) -> list[str]:
    s = SETTINGS
    return [sys.executable, "-m", "vqtriton.cli", "demo", "--steps", str(STEPS), "--codes", str(s["codes"]),
            "--batch", str(s["batch"]), "--save-every", str(SAVE_EVERY), "--backend", s["backend"],
            "--device", s["device"], "--out", str(out), *(["--ema"] if s["ema"] else [])]


def env(fault: str | None = None) -> dict:
    e = {**{k: v for k, v in os.environ.items() if k != demo.FAULT_ENV}, "OMP_NUM_THREADS": "1"}  # see run_demo
    return e if fault is None else {**e, demo.FAULT_ENV: fault}


def held_out_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("held-out digits"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run as a subprocess: its checkpoint and its printed held-out metrics."""
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run(cli_args(out), env=env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return checkpoint.load(out / demo.CHECKPOINT), held_out_line(done.stdout)


def when(point) -> tuple[int, int]:
    """A kill point's place in time: during step n, or writing the checkpoint of step n (after step n - 1)."""
    kind, n, phase = point
    if kind == "step":
        return n, demo.FAULT_PHASES["step"].index(phase)
    return n - 1, 3 + demo.FAULT_PHASES["save"].index(phase)


def kill_plan(rng: random.Random) -> list[tuple[str, int, str]]:
    """One kill at each phase of a step and of a checkpoint write, at random steps, in the order they happen."""
    points = [("step", rng.randrange(STEPS), p) for p in demo.FAULT_PHASES["step"]]
    points += [("save", rng.choice(SAVES), p) for p in demo.FAULT_PHASES["save"]]
    return sorted(points, key=when)


def last_save(point) -> int | None:
    """The checkpoint on disk after a kill at ``point``: the last write that reached its rename."""
    kind, n, phase = point
    done = [s for s in SAVES if (s <= n if kind == "step" else s < n or phase == "renamed" and s == n)]
    return done[-1] if done else None


def history_before(history: dict, step: int) -> dict:
    keep = sum(s < step for s in history["step"])
    return {k: v[:keep] for k, v in history.items()}


@needs_sigkill
def test_killed_at_random_points_and_resumed_the_demo_ends_as_if_never_stopped(tmp_path, reference):
    """One folder, one job killed six times (in a step's forward, backward and update; with a checkpoint
    write's temp file partial, complete but not renamed, and renamed) and resumed each time."""
    ref, ref_line = reference
    plan = kill_plan(random.Random(SEED))
    why = f"kill plan {plan} (seed {SEED}; set VQTRITON_RESUME_TEST_SEED to try another)"
    path = tmp_path / demo.CHECKPOINT
    args = cli_args(tmp_path)
    stale_before: list[str] = []
    for point in plan:
        kind, n, phase = point
        run = subprocess.run([*args, "--resume"], env=env(f"{kind}:{n}:{phase}"), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
        at = f"{why}: after the kill at {point}"
        assert run.returncode == -signal.SIGKILL, f"{at}: exit {run.returncode}\n{run.stderr[-3000:]}"
        assert not any(os.path.exists(t) for t in stale_before), f"{at}: the run did not remove the stale temp file"
        expected = last_save(point)
        if expected is None:
            assert not path.exists(), at
        else:  # the checkpoint on disk loads, and holds every step up to the last save
            saved = checkpoint.load(path)
            assert saved["step"] == expected, at
            assert saved["history"] == history_before(ref["history"], expected), at
        stale = checkpoint.stale_temp_files(path)
        if kind == "save" and phase != "renamed":
            assert len(stale) == 1, f"{at}: temp files {stale}"
            if phase == "partial":  # some bytes of the new checkpoint, never read
                assert os.path.getsize(stale[0]) > 0
                with pytest.raises(CheckpointError, match="cannot be read"):
                    checkpoint.load(stale[0])
            else:  # the whole new checkpoint, killed before its rename
                assert checkpoint.load(stale[0])["step"] == n, at
        else:
            assert stale == [], f"{at}: temp files {stale}"
        stale_before = stale
    final = subprocess.run([*args, "--resume"], env=env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert final.returncode == 0, f"{why}\n{final.stderr[-3000:]}"
    resumed_from = last_save(plan[-1])
    assert (f"resumed from step {resumed_from}" if resumed_from else "started at step 0") in final.stdout, why
    assert checkpoint.stale_temp_files(path) == [], why
    assert_same(checkpoint.load(path), ref, why)
    assert held_out_line(final.stdout) == ref_line, why


@needs_sigkill
def test_sigkilled_from_outside_at_random_moments_the_demo_ends_as_if_never_stopped(tmp_path, reference):
    """A real preemption: SIGKILL from another process at a random moment (where it lands is up to the
    scheduler). While the run writes checkpoints, this process reads them: every read succeeds."""
    ref, _ = reference
    rng = random.Random(SEED)
    path, args, landed = tmp_path / demo.CHECKPOINT, cli_args(tmp_path), []
    for _ in range(2):
        delay = rng.uniform(0.0, 0.4)
        start = checkpoint.load(path)["step"] if path.exists() else 0
        err = tmp_path / "stderr.txt"
        with open(err, "wb") as f:  # a file, not a pipe: the progress bar never blocks on a full pipe
            proc = subprocess.Popen([*args, "--resume"], env=env(), stdout=subprocess.DEVNULL, stderr=f)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:  # wait for a checkpoint of this run
                if path.exists() and checkpoint.load(path)["step"] > start:
                    break
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        step = checkpoint.load(path)["step"]
        landed.append((round(delay, 3), proc.returncode, step))
        why = f"seed {SEED}: (delay s, exit status, checkpoint step) per kill: {landed}"
        assert proc.returncode in (0, -signal.SIGKILL), f"{why}\n{err.read_text()[-3000:]}"
        assert step in SAVES and checkpoint.load(path)["history"] == history_before(ref["history"], step), why
    final = subprocess.run([*args, "--resume"], env=env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same(checkpoint.load(path), ref, f"seed {SEED}: kills landed at {landed}")

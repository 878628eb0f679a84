"""Step distillation on `shapes` and `shapes-latent`: DDIM+CFG teachers vs guidance-embedded
progressive students.

Rows of ``bench/out/step_distill.json`` (1000 validation prompts; adherence and FD as
``snapc evaluate`` reports them), appended as each finishes so a run split over sessions
resumes where it stopped (rows already there are skipped; a training job interrupted by a
time limit resumes from its last checkpoint when run again)::

    python bench/step_distill.py --jobs teacher                  # DDIM + CFG, 1/2/4/8 steps
    python bench/step_distill.py --jobs student-4                # shapes 32 -> 16 -> 8 -> 4
    python bench/step_distill.py --jobs student-1                # that 4-step student -> 2 -> 1
    python bench/step_distill.py --jobs shapes-fast --save snapc/weights/shapes-fast
    python bench/step_distill.py --plot [--write-results]        # PNG + table (RESULTS.md)
    python bench/step_distill.py --family shapes-latent --jobs teacher student-4

``--family shapes-latent`` runs the ``teacher`` (also at 25 steps) and ``student-4`` jobs on the
latent pipeline (rows in ``bench/out/step_distill_latent.json``; adherence and FD of the whole
pipeline, decoder included, as ``snapc evaluate shapes-latent`` reports them; its students are
sampled with the loss's alpha floor, see snapc.train.steps; the teacher is measured with that
floor too, at trailing spacing, so the table shows what the floor alone is worth).

Jobs: ``teacher`` (the shipped model, DDIM with CFG 3 at 1, 2, 4 and 8 steps, linspace and
trailing spacing, two UNet calls per step), ``student-4`` (``snapc distill shapes
--sampling-steps 4``: rounds 32 -> 16 -> 8 -> 4 with guidance 3 built in; rows at 8 and 4
steps from its kept rounds), ``student-1`` (the 4-step student distilled on to 2 and 1 steps;
its own teacher, one call per step; rows at 2 and 1), ``shapes-fast`` (``shapes-small``, the
pruned and recovered model, distilled 32 -> 4; row at 4). Students sample with trailing
timesteps and one conditional UNet call per step. Each round trains ``--steps-per-round``
steps or ``--minutes-per-round`` minutes, whichever ends first (default 1000 steps, at most
2.5 minutes, so a 3-round job fits in a 10-minute slot).

Cost (estimate for an H200 at batch 512; recovery trains the shapes UNet at ~9 it/s there): a
round-1 step runs the teacher twice under CFG (2 x 1024 rows, no grad) and the student once
with its backward, about 7 forward-equivalents of 512 rows against recovery's 4, so ~5 it/s;
later rounds (a one-call teacher) ~7 it/s. 1000 steps a round: ``student-4`` ~8 min,
``student-1`` ~5 min, ``shapes-fast`` ~6 min (its UNet is about half the cost), ``teacher``
~2 min of evaluation. The trained folders are kept under ``bench/out/step_distill/``
(``--out``'s stem); ``student-1`` needs ``student-4``'s folder there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snapc.artifacts import atomic_output_file  # noqa: E402

OUT = {"shapes": REPO / "bench" / "out" / "step_distill.json",
       "shapes-latent": REPO / "bench" / "out" / "step_distill_latent.json"}
JOBS = ("teacher", "student-4", "student-1", "shapes-fast")
LATENT_JOBS = ("teacher", "student-4")
TEACHER_STEPS = {"shapes": (1, 2, 4, 8), "shapes-latent": (1, 2, 4, 8, 25)}
# alpha floors the teacher is also sampled with at trailing spacing: for shapes-latent the
# students' floor, so the table shows what the floor alone gives the undistilled teacher
TEACHER_FLOORS = {"shapes": (0.0,), "shapes-latent": (0.0, 0.05)}
GUIDANCE = 3.0
SECTION = {"shapes": "Step distillation: fewer steps, guidance built in",
           "shapes-latent": "Step distillation on shapes-latent"}
# issue 17's goals for shapes; for shapes-latent, issue 19's adherence bar (0.90) at 4 steps
GOALS = {"shapes": [("student", 4, 0.92, 30.0), ("student", 2, 0.88, None),
                    ("shapes-fast", 4, 0.91, None)],
         "shapes-latent": [("student", 4, 0.90, None), ("student", 8, 0.90, None)]}


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _write(path: Path, rows: list[dict], machine: str) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


def _key(row: dict) -> tuple:
    return row["model"], row["steps"], row["spacing"], row.get("alpha_floor", 0.0)


def _evaluate(model: str, args, **sampler) -> dict:
    from snapc.evaluation import evaluate_model
    from snapc.evaluation_latent import evaluate_latent

    evaluate = evaluate_latent if args.family == "shapes-latent" else evaluate_model
    result = evaluate(model, prompts=args.prompts, device=args.device, **sampler)
    return {k: result[k] for k in ("steps", "guidance", "spacing", "alpha_floor", "adherence",
                                   "fd", "unet_calls_per_image", "exact", "colour")}


def _distil(model: str, folder: Path, steps: int, args, *, own_teacher: bool) -> dict:
    """Distil ``model`` to ``steps`` into ``folder`` (kept rounds) unless it is there; resume
    an interrupted run. ``own_teacher``: the model has guidance built in and starts from its
    stored steps. Return its training record."""
    from snapc.train import StepOptions, TrainOptions, distill_steps
    from snapc.train.distill import checkpoint_folder

    if (folder / "training.json").is_file():
        print(f"  {folder.name}: trained earlier, reusing it", flush=True)
        return json.loads((folder / "training.json").read_text())
    resume = (checkpoint_folder(folder) / "plan.json").is_file()
    options = StepOptions(model=model, out=folder, sampling_steps=steps,
                          start_steps=None if own_teacher else args.start_steps,
                          guidance=None if own_teacher else GUIDANCE,
                          name=folder.name, keep_rounds=True, force=True, resume=resume)
    train = TrainOptions(steps=args.steps_per_round, minutes=args.minutes_per_round,
                         batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema, seed=0,
                         device=args.device, checkpoint_every=args.checkpoint_every,
                         log_every=50)
    return distill_steps(options, train, report=lambda m: print(f"  {m}", flush=True))


def _student_folders(job: str, work: Path,
                     family: str) -> tuple[str, Path, int, dict[int, Path]]:
    """Return (model distilled, output folder, its steps, {row steps: folder}) of a job."""
    if job == "student-4":
        out = work / "student-4"
        return family, out, 4, {8: out / "rounds" / "8-steps", 4: out}
    if job == "student-1":
        out = work / "student-1"
        return str(work / "student-4"), out, 1, {2: out / "rounds" / "2-steps", 1: out}
    out = work / "shapes-fast"
    return "shapes-small", out, 4, {4: out}


def run(args) -> None:
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = _load(args.out)
    done = {_key(r) for r in rows}
    work = args.out.parent / args.out.stem

    def add(row: dict) -> None:
        rows.append({**row, "prompts": args.prompts, "machine": machine})
        _write(args.out, rows, machine)
        print(json.dumps(row), flush=True)

    for job in args.jobs:
        print(f"== {job}", flush=True)
        if job == "teacher":
            runs = [("linspace", 0.0)] + [("trailing", f) for f in TEACHER_FLOORS[args.family]]
            for spacing, floor in runs:
                for steps in TEACHER_STEPS[args.family]:
                    if ("teacher", steps, spacing, floor) in done:
                        continue
                    add({"model": "teacher", **_evaluate(args.family, args, steps=steps,
                                                         guidance=GUIDANCE, spacing=spacing,
                                                         alpha_floor=floor)})
            continue
        model, out, steps, evaluated = _student_folders(job, work, args.family)
        label = "shapes-fast" if job == "shapes-fast" else "student"
        trained = {k[:3] for k in done}  # a student's floor is its stored sampler's
        if all((label, s, "trailing") in trained for s in evaluated):
            print(f"  rows of {job} are in {args.out.name}", flush=True)
        else:
            if job == "student-1" and not (work / "student-4" / "training.json").is_file():
                raise SystemExit("student-1 continues the 4-step student: run --jobs "
                                 "student-4 first")
            start = time.perf_counter()
            record = _distil(model, out, steps, args, own_teacher=job == "student-1")
            rounds = {r["student_steps"]: r for r in record["rounds"]}
            upstream = 0.0  # student-1 starts from student-4: count its training too
            if job == "student-1":
                upstream = json.loads((work / "student-4" / "training.json").read_text())[
                    "train_seconds"]
            for s, folder in evaluated.items():
                if (label, s, "trailing") in trained:
                    continue
                add({"model": label, **_evaluate(str(folder), args),
                     "train_minutes": round((upstream + sum(
                         r["train_seconds"] for r in record["rounds"]
                         if r["student_steps"] >= s)) / 60, 2),
                     "round_steps": rounds[s]["steps"], "from": model,
                     "wall_seconds": round(time.perf_counter() - start, 1)})
        if job == "shapes-fast" and args.save:
            shutil.copytree(out, args.save, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("rounds"))
            print(f"  saved {out} -> {args.save}", flush=True)


def _floor(row: dict) -> float:
    return row.get("alpha_floor", 0.0)


def _find(rows: list[dict], model: str, steps: int, floor: float | None = 0.0) -> dict | None:
    """The trailing row of ``model`` at ``steps`` (teachers: at alpha ``floor``; None: any)."""
    return next((r for r in rows if r["model"] == model and r["steps"] == steps
                 and r["spacing"] == "trailing" and (floor is None or _floor(r) == floor)),
                None)


def _table(rows: list[dict]) -> str:
    head = ("| model | steps | spacing | UNet calls / image | adherence | exact | FD | training |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    order = {"teacher": 0, "student": 1, "shapes-fast": 2}
    lines = [head]
    for r in sorted(rows, key=lambda r: (order.get(r["model"], 9), r["spacing"], _floor(r),
                                         r["steps"])):
        trained = f"{r['train_minutes']:.1f} min" if "train_minutes" in r else "-"
        spacing = r["spacing"] + (f", alpha floor {_floor(r):g}"
                                  if r["model"] == "teacher" and _floor(r) else "")
        lines.append(f"| {r['model']} | {r['steps']} | {spacing} | "
                     f"{r['unet_calls_per_image']} | {r['adherence']:.3f} | "
                     f"{r.get('exact', float('nan')):.3f} | {r['fd']:.1f} | {trained} |")
    return "\n".join(lines)


def _goals(rows: list[dict], family: str) -> str:
    """The family's goals (GOALS), each with the row that answers it (or 'not measured')."""
    goals = GOALS[family]
    lines = ["", "", "| goal | measured | met |", "| --- | --- | --- |"]
    for model, steps, adherence, fd in goals:
        want = f"{model} at {steps} steps: adherence >= {adherence}" + (
            f", FD <= {fd:g}" if fd is not None else "")
        r = _find(rows, model, steps, floor=None)
        if r is None:
            lines.append(f"| {want} | not measured | - |")
            continue
        met = r["adherence"] >= adherence and (fd is None or r["fd"] <= fd)
        lines.append(f"| {want} | {r['adherence']:.3f} / FD {r['fd']:.1f} | "
                     f"{'yes' if met else 'no'} |")
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _reading(rows: list[dict]) -> str:
    """One sentence per student row: its adherence / FD against the CFG teacher at the same
    steps (trailing, twice the calls) and at the most steps measured."""
    teacher_steps = [r["steps"] for r in rows if r["model"] == "teacher"]
    full = _find(rows, "teacher", max(teacher_steps)) if teacher_steps else None
    lines = []
    for r in sorted((r for r in rows if r["model"] == "student"), key=lambda r: r["steps"]):
        same = _find(rows, "teacher", r["steps"])
        if same is None or full is None:
            continue
        floored = [t for t in rows if t["model"] == "teacher" and t["steps"] == r["steps"]
                   and t["spacing"] == "trailing" and _floor(t) > 0]
        with_floor = "".join(f" (with alpha floor {_floor(t):g}: {t['adherence']:.3f} / FD "
                             f"{t['fd']:.1f})" for t in floored)
        at_full = ("" if full["steps"] == r["steps"] else
                   f", at {_n(full['steps'], 'step')} ({_n(full['unet_calls_per_image'], 'call')})"
                   f" {full['adherence']:.3f} / FD {full['fd']:.1f}")
        lines.append(f"- {_n(r['steps'], 'step')}: the student "
                     f"({_n(r['unet_calls_per_image'], 'UNet call')}) scores "
                     f"{r['adherence']:.3f} / FD {r['fd']:.1f}; the CFG teacher at the same "
                     f"{_n(r['steps'], 'trailing step')} "
                     f"({_n(same['unet_calls_per_image'], 'call')}) {same['adherence']:.3f} / FD "
                     f"{same['fd']:.1f}{with_floor}{at_full}.")
    return ("\n\n" + "\n".join(lines)) if lines else ""


def _cpu_check(family: str) -> str:
    """The `snapc evaluate` run of the family's student on the CPU, when its JSON is in
    bench/out."""
    name = {"shapes": "shapes_fast", "shapes-latent": "latent_student"}[family]
    path = REPO / "bench" / "out" / f"evaluate_{name}_cpu.json"
    if not path.is_file():
        return ""
    r = json.loads(path.read_text())
    teacher = {"shapes": "0.934 / FD 20.9 on the 1000 prompts (\"Reference model: shapes\")",
               "shapes-latent": "0.932 / FD 125.3 on these 200 prompts on this CPU "
                                "(\"shapes-latent\")"}[family]
    return (f"\n`snapc evaluate {r['model']} --prompts {r['prompts']} --json` on the 2-core CPU "
            f"(its own sampler: {r['steps']} {r['spacing']} steps, guidance {r['guidance']:g} "
            f"built in, {r['unet_calls_per_image']} UNet calls per image): adherence "
            f"**{r['adherence']:.3f}**, exact {r['exact']:.3f}, FD {r['fd']:.1f} (FD of "
            f"{r['prompts']} samples is biased upward), {r['seconds']:.0f} s "
            f"(`bench/out/{path.name}`). The 25-step CFG teacher scores {teacher}.\n")


def _samples(out: Path) -> str:
    """A line naming the sample grid beside the rows file, when bench/shapes_latent_samples.py
    drew one there."""
    png = out.with_name(out.stem + "_samples.png")
    if not png.is_file():
        return ""
    return (f"\nSample grid (prompt's scene, teacher, student; `bench/shapes_latent_samples.py "
            f"--student DIR`): `{png.relative_to(REPO)}`.\n")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snapc.plots import save_figure

    data = json.loads(args.out.read_text())
    rows = data["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    series = {("teacher", "linspace", 0.0): ("DDIM + CFG, linspace", "o--"),
              ("teacher", "trailing", 0.0): ("DDIM + CFG, trailing", "s--"),
              ("teacher", "trailing", 0.05): ("DDIM + CFG, trailing, alpha floor 0.05", "D:"),
              ("student", "trailing", None): ("student (guidance built in)", "^-"),
              ("shapes-fast", "trailing", None): ("shapes-fast (pruned + distilled)", "*")}
    for (model, spacing, floor), (label, style) in series.items():
        pts = sorted((r["unet_calls_per_image"], r["adherence"], r["fd"]) for r in rows
                     if r["model"] == model and r["spacing"] == spacing
                     and (floor is None or _floor(r) == floor))
        if not pts:
            continue
        calls, adherence, fd = zip(*pts, strict=True)
        a.plot(calls, adherence, style, label=label, markersize=8)
        b.plot(calls, fd, style, label=label, markersize=8)
    a.set(xscale="log", xlabel="UNet calls per image", ylabel="prompt adherence",
          title="adherence (higher is better)")
    b.set(xscale="log", yscale="log", xlabel="UNet calls per image", ylabel="FD",
          title="Fréchet distance (lower is better)")
    from matplotlib.ticker import NullFormatter

    ticks = sorted({r["unet_calls_per_image"] for r in rows})
    for ax in (a, b):  # the measured call counts as plain numbers (no log-scale minor labels)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(args.family)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    png = save_figure(fig, args.out.with_suffix(".png"))
    table = _table(rows) + _goals(rows, args.family) + _reading(rows)
    prompts = sorted({r["prompts"] for r in rows})
    body = (f"Measured on {data['machine']} by `bench/step_distill.py --family {args.family}`, "
            f"{'/'.join(map(str, prompts))} validation prompts, CFG {GUIDANCE:g} (built into "
            f"the students). Plot: `{png.relative_to(REPO) if png.is_relative_to(REPO) else png}`"
            f".\n\n{table}\n") + _cpu_check(args.family) + _samples(args.out)
    md = args.out.with_suffix(".md")
    with atomic_output_file(md) as tmp:
        tmp.write_text(body)
    print(body)
    print(f"wrote {png} and {md}")
    if args.write_results:
        sys.path.insert(0, str(REPO / "bench"))
        from results import write_section

        write_section(SECTION[args.family], body)
        print("updated bench/RESULTS.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=tuple(OUT), default="shapes")
    p.add_argument("--jobs", nargs="*", choices=JOBS)
    p.add_argument("--steps-per-round", type=int, default=1000)
    p.add_argument("--minutes-per-round", type=float, default=2.5)
    p.add_argument("--start-steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="rows file (default: the family's in bench/out; "
                   "its stem names the folder of the trained students beside it)")
    p.add_argument("--save", type=Path, help="copy the shapes-fast folder here")
    p.add_argument("--plot", action="store_true", help="PNG + markdown table of the rows")
    p.add_argument("--write-results", action="store_true",
                   help="with --plot: replace the section in bench/RESULTS.md")
    args = p.parse_args()
    family_jobs = LATENT_JOBS if args.family == "shapes-latent" else JOBS
    args.jobs = list(family_jobs) if args.jobs is None else args.jobs
    wrong = [j for j in args.jobs if j not in family_jobs]
    if wrong:
        p.error(f"job {wrong[0]} is not run for {args.family} (its jobs: "
                f"{', '.join(family_jobs)})")
    args.out = args.out or OUT[args.family]
    if args.plot:
        plot(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

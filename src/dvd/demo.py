"""``dvd demo``: the whole paper on a CPU in minutes, through the same code paths as the cluster jobs.

Stages (each one a call of a ``dvd`` command's ``cli`` with a config written to ``OUT/configs``):

1. ShapesWorld (``dvd data shapesworld``).
2. Clean CLIP and ΔCLIP from scratch; TeCoA and FARE fine-tuned from the clean CLIP (``dvd train clip``).
3. Zero-shot classification on every ShapesWorld task and image-text retrieval, clean and under APGD at
   every budget, the same attack for every model (``dvd eval zeroshot`` / ``retrieval``).
4. Unless ``--no-vlm``: LLaVA's recipe on four towers: clean-llava (clean CLIP), fare-llava (FARE) and
   delta-llava (ΔCLIP), clean instruction tuning, and delta2-llava (ΔCLIP, adversarial instruction tuning
   in both stages, or in stage 2 from a branch point of delta-llava's run: ``delta2_branch_step``); each
   evaluated with ``dvd eval caption | vqa | pope | targeted | scienceqa | mme``.
5. ``OUT/report.md`` + PNG plots + ``OUT/results.json`` (:mod:`dvd.demo_report`).

``--seeds 0,1,2`` runs all of it once per seed in ``OUT/seed-<s>/`` and writes one report over the seeds
(:mod:`dvd.demo_seeds`).

A finished stage is recorded in ``OUT/stages.json`` and reused on a re-run (a training stage is finished
when its ``final`` folder exists); an interrupted training resumes from its last checkpoint
(``resume=latest``) and an interrupted evaluation from its per-batch state, so a Ctrl-C'd demo re-run
with the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from dvd.config import ConfigError, positive_int
from dvd.data import shapesworld
from dvd.demo_preset import (
    ADVERSARIAL_VLMS,
    BRANCHES,
    CLIP_MODELS,
    LM_MODEL,
    TARGET_CAPTION,
    VISION_TOWER,
    VLM_EVALS,
    VLM_MODELS,
    DemoLayout,
    DemoPreset,
    ReportInputs,
    load_preset,
)
from dvd.demo_seeds import parse_seeds, run_seeds
from dvd.demo_stages import Ledger, Stage, check, exit_with_parent, load_average, now, quiet_stdout
from dvd.eval.report import average_rows
from dvd.eval.results import read_rows
from dvd.io import read_json, write_json
from dvd.train.precision import native_precision

# The trainers, the evaluations and the report (open_clip, transformers, matplotlib: ~5 s of imports) are
# imported where a stage first needs them, so that the demo's own process starts its workers and writes the
# world without waiting for them. Its workers import them first, while the world is written.
WORKER_IMPORTS = ("dvd.train.clip", "dvd.train.vlm", "dvd.eval.zeroshot", "dvd.eval.captioning")

# ---------------------------------------------------------------------------------------------
# stages


class Demo:
    """The demo in ``out`` with ``preset``: builds the stage list and runs what is not finished yet."""

    def __init__(
        self,
        out: str | Path,
        preset: DemoPreset,
        *,
        device: str = "cpu",
        vlm: bool = True,
        threads: int = 1,
        log: Any = None,
    ) -> None:
        self.out = Path(out)
        self.worker: int | None = None  # k: this process is worker k of the run ``run_id``
        # this run's stages carry it (the report times them; a worker takes its parent's)
        self.run_id = f"{os.getpid()}-{time.time_ns()}"
        self.failed: list[str] = []  # stages that raised in this run (recorded, reported, exit status 1)
        self.include_vlm = vlm
        self.threads = threads
        self.world_workers = 1  # processes writing the world's pre-training shards (run(jobs=N): N)
        self.preset = preset
        self.device = device
        self.log = log if log is not None else sys.stderr
        self.layout = DemoLayout(self.out)
        self.world = self.layout.world
        self.ledger = Ledger.load(self.out / "stages.json")

    # -- paths ---------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.layout.model_dir(name)

    def final(self, name: str) -> Path:
        return self.layout.final(name)

    def results_file(self, task: str, model: str) -> Path:
        return self.layout.results_file(task, model)

    # -- the plan --------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        stages = [Stage("world", self._world, lambda: (self.world / "summary.json").is_file())]
        for name in CLIP_MODELS:
            needs = ("world", "train clean-clip") if name in ("tecoa", "fare") else ("world",)
            stages.append(
                Stage(f"train {name}", self._train_clip_fn(name), self._final_exists(name), needs=needs)
            )
        for name in CLIP_MODELS:
            for task in ("zeroshot", "retrieval"):
                run = self._clip_eval_fn(task, name)
                stages.append(
                    Stage(f"{task} {name}", run, self._evaluated(task, name), needs=(f"train {name}",))
                )
        trained = tuple(f"train {name}" for name in CLIP_MODELS)
        stages.append(Stage("examples clip", self._examples_fn("clip"), self._drawn("clip"), needs=trained))
        if self.include_vlm:
            shared_lm = (f"train {LM_MODEL}",) if self.preset.lm_training else ()
            if shared_lm:
                done = self._final_exists(LM_MODEL)
                stages.append(Stage(shared_lm[0], self._train_lm, done, "vlm", ("world",)))
            for name, vision in VISION_TOWER.items():
                for stage, needs in self._vlm_trainings(name, vision, shared_lm):
                    stages.append(
                        Stage(f"train {name} {stage}", self._train_vlm_fn(name, vision, stage),
                              self._final_exists(f"{name}-{stage}"), "vlm", needs)
                    )
            for name in VLM_MODELS:
                for task in VLM_EVALS:
                    run, done = self._vlm_eval_fn(task, name), self._evaluated(task, name)
                    stages.append(Stage(f"{task} {name}", run, done, "vlm", (f"train {name} stage2",)))
            trained = tuple(f"train {name} stage2" for name in VLM_MODELS)
            stages.append(Stage("examples vlm", self._examples_fn("vlm"), self._drawn("vlm"), "vlm", trained))
        return stages

    def _vlm_trainings(
        self, name: str, vision: str, shared_lm: tuple[str, ...]
    ) -> list[tuple[str, tuple[str, ...]]]:
        """The training stages of VLM ``name`` and their inputs: stage 1 on its tower, stage 2 on its stage
        1; a branched Δ²LLaVA (``delta2_branch_step``) only a stage 2, from its clean parent's run."""
        parent = BRANCHES.get(name) if self.preset.delta2_branch_step is not None else None
        if parent:
            return [("stage2", (f"train {parent} stage2",))]
        return [("stage1", (f"train {vision}", *shared_lm)), ("stage2", (f"train {name} stage1",))]

    def branch_point(self) -> Path:
        """The checkpoint of delta-llava's stage 2 that a branched Δ²LLaVA starts from."""
        step = self.preset.delta2_branch_step
        return self.model_dir(f"{BRANCHES['delta2-llava']}-stage2") / "checkpoints" / f"step-{step:09d}"

    def _evaluated(self, task: str, model: str) -> Callable[[], bool]:
        name = f"{task} {model}"
        return lambda: self.ledger.finished(name) and self.results_file(task, model).is_file()

    def _drawn(self, half: str) -> Callable[[], bool]:
        name = f"examples {half}"
        return lambda: self.ledger.finished(name) and self.layout.example_grid(half).is_file()

    def _examples_fn(self, half: str) -> Callable[[], None]:
        """Draw the report's example grid of the CLIPs or the VLMs: a stage of its own, so that the workers
        attack its few images beside the evaluations instead of the report doing it after them."""

        def run() -> None:
            from dvd.demo_examples import draw_example_grid

            draw_example_grid(self.report_inputs(), half)

        return run

    def report_inputs(self) -> ReportInputs:
        """What the report and the example grids take besides the demo folder."""
        return ReportInputs(self.layout, self.preset, device=self.device, include_vlm=self.include_vlm)

    def _final_exists(self, name: str) -> Callable[[], bool]:
        return lambda: (
            (self.final(name) / "open_clip_config.json").is_file()
            or (self.final(name).is_dir() and any(self.final(name).iterdir()))
        )

    def schedule(self) -> list[Stage]:
        """The stages in the order ``--jobs N``'s workers take them up: the trainings first (each unlocks
        the evaluations of its model and the trainings on top of it), in the plan's order, then the
        evaluations. A stage's inputs always come earlier in this order."""
        return sorted(self.stages(), key=lambda stage: not stage.name.startswith(("world", "train ")))

    def run(self, *, only: Sequence[str] = (), jobs: int = 1, report: bool = True) -> dict[str, Any]:
        """Run every unfinished stage (or those whose names start with one of ``only``), then the report.

        ``jobs=N`` starts N worker processes (``dvd demo --worker``) that take up the stages one at a time
        (:meth:`schedule`), each as soon as its inputs are done; this process writes the world while they
        start up (importing torch takes seconds).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        total = time.perf_counter()
        if self.worker is not None:
            self._work()
            return {}
        self._say_precision()
        if jobs > 1 and not only and not all(stage.done() for stage in self.stages()):
            self.world_workers = jobs  # the cores the workers will use, idle while they import
            world = self.stages()[0]
            if world.done():
                self._run_workers(jobs)
            else:  # claimed before the workers start, written while they import
                self.ledger.record(world.name, status="running", started=now(), run=self.run_id)
                self._run_workers(jobs, meanwhile=lambda: self._run_stage(world))
        else:  # in turn, or nothing left to run (no worker processes to start just to reuse everything)
            self._run_stages(only)
        if not report:
            return {}
        self.ledger = Ledger.load(self.ledger.path)  # the workers recorded their stages
        results = self.collect_results()
        tick = time.perf_counter()
        from dvd.demo_report import write_report

        report_path = write_report(self.report_inputs(), results)
        self.ledger.record(
            "report", status="done", seconds=round(time.perf_counter() - tick, 1), finished=now()
        )
        self._say(f"[demo] report written to {report_path} ({time.perf_counter() - total:.0f} s this run)")
        return {"report": str(report_path), "results": str(self.out / "results.json"), "failed": self.failed}

    def _run_workers(self, jobs: int, meanwhile: Callable[[], None] | None = None) -> None:
        run = self.run_id  # tells this run's claims from a killed run's leftovers
        argv = [sys.executable, "-m", "dvd.cli", "demo", "--out", str(self.out), "--preset", self.preset.name,
                "--device", self.device, "--threads", str(self.threads), "--no-report",
                "--seeds", str(self.preset.seed)]
        if not self.include_vlm:
            argv.append("--no-vlm")
        children = []
        try:
            for worker in range(1, jobs + 1):
                children.append(subprocess.Popen([*argv, "--worker", f"{run}/{worker}"]))
            if meanwhile is not None:
                meanwhile()
            codes = [child.wait() for child in children]
        except KeyboardInterrupt:
            for child in children:  # they got the same Ctrl-C; let them record where they stopped
                child.wait()
            raise
        if any(code == 130 for code in codes):
            raise KeyboardInterrupt
        self._record_lost(run, codes)
        self.ledger = Ledger.load(self.ledger.path)  # the workers recorded their stages
        self.failed += [n for n, info in self.ledger.entries.items()
                        if info.get("status") == "failed" and n not in self.failed]

    def _record_lost(self, run: str, codes: Sequence[int]) -> None:
        """After the workers of ``run`` exited (statuses ``codes``, worker k's at k - 1): a stage a dead
        worker was running, and any stage no worker took up, is recorded as failed, so the report and the
        exit status say so instead of leaving it out."""
        if not any(codes):
            return
        dead = next(code for code in codes if code)
        with self.ledger.locked() as entries:
            for stage in self.stages():
                entry = entries.get(stage.name, {})
                if entry.get("run") == run and entry.get("status") == "running":
                    code = codes[entry["worker"] - 1]
                    error = f"its worker process exited with status {code}"
                elif entry.get("run") != run and not stage.done():
                    error = f"not run: a worker process exited with status {dead}"
                else:
                    continue
                entries[stage.name] = {**entry, "status": "failed", "error": error, "finished": now()}

    def _work(self) -> None:
        """One worker of ``--jobs N``: take up the next stage no worker of this run has taken whose inputs
        are done, run it, repeat; wait while every stage left needs one still running; stop when none is
        left. The trainers and evaluations are imported first, while the world is still being written."""
        for module in WORKER_IMPORTS:
            importlib.import_module(module)
        while True:
            stage, waiting = self._claim()
            if stage is not None:
                self._run_stage(stage)
            elif waiting:
                time.sleep(1)
            else:
                return

    def _claim(self) -> tuple[Stage | None, bool]:
        """Under the ledger's lock: the first stage of :meth:`schedule` that is free to run, marked as this
        worker's (None if there is none), and whether some stage is left that waits for a running one. A
        stage whose input failed in this run is recorded as failed; one finished earlier as reused."""
        assert self.worker is not None
        run, worker = self.run_id, self.worker
        waiting = False
        with self.ledger.locked() as entries:
            for stage in self.schedule():
                entry = entries.get(stage.name, {})
                if entry.get("run") == run:
                    continue  # taken by a worker of this run: running, done or failed
                if stage.done():
                    if entry.get("status") != "done":
                        entries[stage.name] = {"status": "done", "seconds": None, "reused": True}
                    continue
                needs = {need: entries.get(need, {}) for need in stage.needs}
                failed = [n for n, e in needs.items() if e.get("run") == run and e.get("status") == "failed"]
                if failed:
                    entries[stage.name] = {"status": "failed", "error": self._skip(stage, failed[0]),
                                           "run": run, "worker": worker, "finished": now()}
                    continue
                if all(e.get("status") == "done" for e in needs.values()):
                    entries[stage.name] = {"status": "running", "started": now(), "run": run,
                                           "worker": worker}
                    return stage, waiting
                waiting = True
        return None, waiting

    def _needs_met(self, stage: Stage) -> bool:
        """Whether the stages ``stage`` reads from are done; one that failed fails it too."""
        self.ledger = Ledger.load(self.ledger.path)
        status = {need: self.ledger.entries.get(need, {}).get("status") for need in stage.needs}
        failed = [need for need, state in status.items() if state == "failed"]
        if failed:
            self.ledger.record(stage.name, status="failed", error=self._skip(stage, failed[0]))
            return False
        return True

    def _skip(self, stage: Stage, need: str) -> str:
        """Count ``stage`` as failed because its input ``need`` failed, say so; the ledger's error text."""
        self.failed.append(stage.name)
        self._say(f"[demo] {stage.name}: skipped, it needs {need!r}, which failed")
        return f"needs {need!r}, which failed"

    def _run_stages(self, only: Sequence[str]) -> None:
        for stage in self.stages():
            if only and not any(stage.name.startswith(prefix) for prefix in only):
                continue
            if not stage.done() and not self._needs_met(stage):
                continue
            if stage.done():
                if not self.ledger.finished(stage.name):
                    self.ledger.record(stage.name, status="done", seconds=None, reused=True)
                self._say(f"[demo] {stage.name}: finished earlier, reused")
                continue
            self.ledger.record(stage.name, status="running", started=now(), run=self.run_id)
            self._run_stage(stage)

    def _run_stage(self, stage: Stage) -> None:
        """Run one stage (already recorded as running) and record how it ended and what it cost."""
        self._say(f"[demo] {stage.name} ...")
        tick, cpu = time.perf_counter(), time.process_time()
        try:
            stage.run()
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one broken stage must not lose the others' results
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.ledger.record(stage.name, status="failed", error=message[:300], finished=now())
            self.failed.append(stage.name)
            self._say(f"[demo] {stage.name}: FAILED ({message}); going on with the other stages")
            return
        seconds = round(time.perf_counter() - tick, 1)
        cpu_seconds = round(time.process_time() - cpu, 1)  # all threads of this process
        self.ledger.record(stage.name, status="done", seconds=seconds, cpu_seconds=cpu_seconds,
                           load=load_average(), finished=now())
        self._say(f"[demo] {stage.name}: done in {seconds:.0f} s")

    def collect_results(self) -> Path:
        """Merge every stage's result rows into ``OUT/results.json``, with the zero-shot mean over the
        ShapesWorld tasks as dataset ``average``."""
        rows = []
        for path in sorted((self.out / "results").glob("*.json")):
            rows += [r.to_dict() for r in read_rows(path)]
        rows += _zeroshot_averages(rows)
        path = self.out / "results.json"
        write_json(path, rows)
        return path

    def _check_settings(self) -> None:
        """Refuse to mix the outputs of two presets in one folder."""
        path = self.out / "demo.json"
        settings = {"preset": self.preset.fingerprint(), "device": self.device}
        if path.is_file():
            earlier = read_json(path)
            if earlier.get("preset") != settings["preset"]:
                raise ConfigError(
                    f"{self.out} holds a demo made with other settings (preset "
                    f"{earlier.get('preset', {}).get('name')!r}); use another --out or delete that folder"
                )
        write_json(path, settings)

    def _say_precision(self) -> None:
        """Say when the preset's bf16 trainings run in fp32 here (a CPU without bf16 instructions)."""
        halves = {"CLIPs": self.preset.clip_common, "VLMs": self.preset.vlm_common}
        for half, common in halves.items():
            asked = str(common.get("precision", "auto"))
            if asked != "bf16" or (half == "VLMs" and not self.include_vlm):
                continue
            if native_precision(asked, torch.device(self.device)) == "fp32":
                self._say(f"[demo] this CPU has no bf16 instructions (AVX512-BF16 or AMX): the {half} train "
                          "in fp32, not the preset's bf16, which would be emulated here at several times "
                          "the time")

    def _say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    # -- stage bodies -------------------------------------------------------------------------------
    def _world(self) -> None:
        # the generator writes into a temporary folder and renames it: an interrupted one starts afresh
        w = self.preset.world
        argv = ["--out", str(self.world), "--seed", str(self.preset.seed), "--size", str(w.size),
                "--image-size", str(w.image_size), "--eval-size", str(w.eval_size),
                "--instruct-size", str(w.instruct_size)]
        if w.spec:
            argv += ["--spec", str(self.world_spec_file())]
        argv += ["--workers", str(self.world_workers)]
        check(shapesworld.cli(argv), "dvd data shapesworld")

    def world_spec_file(self) -> Path:
        """The preset's ShapesWorldSpec overrides, written where ``dvd data shapesworld --spec`` reads."""
        path = self.out / "configs" / "world_spec.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = json.loads(json.dumps(self.preset.world.spec))  # plain lists and mappings for YAML
        header = f"# written by dvd demo (preset {self.preset.name}): the world's ShapesWorldSpec overrides\n"
        path.write_text(header + yaml.safe_dump(spec, sort_keys=False))
        return path

    def clip_config(self, name: str) -> dict[str, Any]:
        """The ``dvd train clip`` config of one of the demo's CLIPs."""
        cfg = {**self.preset.clip_common, **self.preset.clip_recipes[name]}
        if self.preset.clip_model_config is not None:
            cfg["model"] = str(self.model_config_file())
        cfg.update(data=str(self.world), output_dir=str(self.model_dir(name)), seed=self.preset.seed,
                   device=self.device, resume="latest")
        if cfg["recipe"] in ("tecoa", "fare"):
            cfg["pretrained"] = str(self.final("clean-clip"))
        self._native(cfg)
        return cfg

    def _native(self, cfg: dict[str, Any]) -> None:
        """A preset's bf16 only where the device has it: fp32 on a CPU without bf16 instructions, where
        emulated bf16 is several times slower than fp32 (a VLM step 8-10x)."""
        if "precision" in cfg:
            cfg["precision"] = native_precision(str(cfg["precision"]), torch.device(self.device))

    def model_config_file(self) -> Path:
        """The demo's own open_clip model config, written where the stage configs point to it."""
        path = self.out / "configs" / f"{self.preset.clip_model_name}.json"
        if not path.is_file():
            write_json(path, self.preset.clip_model_config)
        return path

    def _train_clip_fn(self, name: str) -> Callable[[], None]:
        def run() -> None:
            config = self._write_config(name, self.clip_config(name))
            from dvd.train import clip as train_clip

            check(train_clip.cli(["--config", str(config)]), f"dvd train clip ({name})")

        return run

    def _eps(self) -> str:
        return ",".join(self.preset.eps)

    def _clip_eval_fn(self, task: str, name: str) -> Callable[[], None]:
        """``dvd eval zeroshot | retrieval`` of one CLIP, the same attack for every model."""
        p, z = self.preset, self.preset.zeroshot
        steps, limit, extra = {
            "zeroshot": (z.steps, z.limit,
                         ["--attack", z.attack, "--escalation-queries", str(z.escalation_queries),
                          "--check-queries", str(z.check_queries)]),
            "retrieval": (p.retrieval.steps, p.retrieval.limit, ["--split", "test"]),
        }[task]

        def run() -> None:
            module = importlib.import_module(f"dvd.eval.{task}")
            argv = ["--model", str(self.final(name)), "--model-name", name, "--dataset", str(self.world),
                    "--eps", self._eps(), *extra, "--steps", str(steps), "--limit", str(limit),
                    "--batch-size", "100", "--seed", str(p.seed), "--device", self.device,
                    "--out", str(self.results_file(task, name)), "--no-progress"]
            with quiet_stdout():
                check(module.cli(argv), f"dvd eval {task} ({name})")

        return run

    def vlm_config(self, name: str, vision: str, stage: str) -> dict[str, Any]:
        """The ``dvd train vlm`` config of one stage of one of the demo's VLMs."""
        cfg = self.preset.vlm_stage_keys(stage)
        cfg.update(data=str(self.world), output_dir=str(self.model_dir(f"{name}-{stage}")),
                   seed=self.preset.seed, device=self.device, resume="latest",
                   adversarial=name in ADVERSARIAL_VLMS)
        self._native(cfg)
        if stage == "stage1":
            cfg["vision"] = str(self.final(vision))
            if self.preset.lm_training:
                cfg["lm"] = str(self.final(LM_MODEL))
        else:
            branching = self.preset.delta2_branch_step is not None
            parent = BRANCHES.get(name) if branching else None
            cfg["init"] = str(self.final(f"{parent or name}-stage1"))
            if parent:
                cfg["branch_from"] = str(self.branch_point())
            elif branching and name in BRANCHES.values():  # keep the checkpoint a branch starts from
                after = cfg["steps"] - self.preset.delta2_branch_step
                cfg["keep_last"] = max(cfg.get("keep_last", 3), after // cfg.get("checkpoint_every", 100) + 1)
        if not cfg["adversarial"]:
            for key in ("eps", "attack_steps", "attack_step_size", "eps_warmup_steps"):
                cfg.pop(key, None)
        return cfg

    def lm_config(self) -> dict[str, Any]:
        """The ``dvd train lm`` config of the VLMs' shared language model: the VLMs' LM, tokenizer, template
        and text length unless the preset's ``lm_training`` sets them."""
        common = self.preset.vlm_common
        cfg = {key: common[key] for key in ("lm", "tokenizer", "template", "max_length") if key in common}
        cfg.update(self.preset.lm_training)
        cfg.update(data=str(self.world), output_dir=str(self.model_dir(LM_MODEL)), seed=self.preset.seed,
                   device=self.device, resume="latest")
        return cfg

    def _train_lm(self) -> None:
        config = self._write_config(LM_MODEL, self.lm_config())
        from dvd.train import lm as train_lm

        check(train_lm.cli(["--config", str(config)]), f"dvd train lm ({LM_MODEL})")

    def _train_vlm_fn(self, name: str, vision: str, stage: str) -> Callable[[], None]:
        def run() -> None:
            config = self._write_config(f"{name}-{stage}", self.vlm_config(name, vision, stage))
            from dvd.train import vlm as train_vlm

            check(train_vlm.cli(["--config", str(config)]), f"dvd train vlm ({name} {stage})")

        return run

    def vlm_eval_argv(self, task: str, name: str) -> list[str]:
        """Arguments of ``dvd eval caption | vqa | pope | targeted | scienceqa | mme`` for one of the demo's
        VLMs (MME clean, on the preset's ``mme_images`` images of each subtask)."""
        p = self.preset
        argv = ["--model", str(self.final(f"{name}-stage2")), "--model-name", name, "--data", str(self.world),
                "--seed", str(p.seed), "--device", self.device, "--out", str(self.results_file(task, name)),
                "--batch-size", str(p.vlm_eval.batch_size), "--no-progress"]
        if task in ("caption", "vqa"):
            limit = p.vlm_eval.questions() if task == "vqa" else p.vlm_eval.limit
            argv += ["--attack", p.vlm_eval.attack, "--eps", ",".join(p.vlm_eval.eps or p.eps),
                     "--steps", str(p.vlm_eval.steps), "--limit", str(limit),
                     "--references", str(p.vlm_eval.references),
                     "--attack-precision", self.attack_precision(),
                     "--save-samples", str(self.layout.samples_dir(task, name))]
        elif task == "pope":
            argv += ["--limit", str(p.vlm_eval.limit)]
        elif task == "scienceqa":
            argv += ["--attack", "apgd", "--eps", ",".join(p.vlm_eval.eps or p.eps),
                     "--steps", str(p.scienceqa.steps), "--limit", str(p.scienceqa.limit),
                     "--attack-precision", self.attack_precision()]
        elif task == "targeted":
            argv += ["--eps", "4/255", "--steps", str(p.targeted.steps), "--limit", str(p.targeted.limit),
                     "--target", TARGET_CAPTION]
        elif task == "mme" and p.mme_images is not None:
            argv += ["--images-per-subtask", str(p.mme_images)]
        return argv

    def attack_precision(self) -> str:
        """The caption / VQA / ScienceQA attacks' ``--attack-precision``: the preset's, bf16 only where the
        device has it (``auto`` is the evaluations' own: fp16 on CUDA, fp32 on a CPU)."""
        precision = self.preset.vlm_eval.precision
        return precision if precision == "auto" else native_precision(precision, torch.device(self.device))

    def clear_stale_samples(self, task: str, name: str) -> None:
        """Before an evaluation starts afresh (no resumable ``.partial`` state), drop the per-sample records
        an earlier run left: the writer skips ids it already has, so a retrained model's records would
        otherwise keep the old model's outputs."""
        partial = Path(f"{self.results_file(task, name)}.partial")
        if not partial.exists():
            shutil.rmtree(self.layout.samples_dir(task, name), ignore_errors=True)

    def _vlm_eval_fn(self, task: str, name: str) -> Callable[[], None]:
        def run() -> None:
            self.clear_stale_samples(task, name)
            module = importlib.import_module(VLM_EVALS[task])
            with quiet_stdout():
                check(module.cli(self.vlm_eval_argv(task, name)), f"dvd eval {task} ({name})")

        return run

    def _write_config(self, name: str, cfg: dict[str, Any]) -> Path:
        path = self.layout.stage_config(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# written by dvd demo (preset {self.preset.name}); rerun with: dvd train ... --config {path}\n"
        )
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        return path


def _zeroshot_averages(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete result rows (readable by ``read_rows``) of the zero-shot mean over the ShapesWorld tasks:
    dataset ``average``, per model x metric x attack x eps; seconds and flags summed over the tasks."""
    zeroshot = [r for r in rows if r["task"] == "zeroshot"]
    out = []
    for avg in average_rows(zeroshot, task="zeroshot"):
        group = [r for r in zeroshot if (r["model"], r["metric"], r["attack"] or "", float(r["eps"]))
                 == (avg["model"], avg["metric"], avg["attack"], avg["eps"])]
        flags = sorted({flag for r in group for flag in r.get("flags") or []})
        out.append({**group[0], **avg, "attack": group[0]["attack"], "flags": flags,
                    "seconds": sum(float(r.get("seconds") or 0.0) for r in group),
                    "skipped": sum(int(r.get("skipped") or 0) for r in group)})
    return out


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu; other names unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cli(argv: Sequence[str]) -> int:
    """``dvd demo [--out DIR] [--preset quick|full] [--device DEV] [--seeds 0,1,2]``"""
    parser = argparse.ArgumentParser(
        prog="dvd demo",
        description="Train and attack clean CLIP, ΔCLIP, TeCoA, FARE and LLaVA on four of them "
        "(clean-llava, fare-llava, delta-llava, delta2-llava) on ShapesWorld; write report.md, PNG plots "
        "and results.json. Re-run to continue an interrupted demo.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--preset", default="quick", help="quick (default), full, or a preset file of "
                        "one's own (FILE.yaml, keys as in configs/demo/quick.yaml)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for the tiny models)"
    )
    parser.add_argument("--no-vlm", action="store_true", help="skip the LLaVA half (CLIP models only)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes that run the stages side by "
                        "side, one core each (default 2; 1: in turn)")
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2: one demo per seed in OUT/seed-<s>/ and one report over "
        "them in OUT (default: the preset's seed, the demo in OUT itself)",
    )
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # the workers
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # RUN/K: worker K of run RUN
    parser.add_argument("--only", action="append", default=[], help="run only stages starting with this")
    args = parser.parse_args(list(argv))
    preset = load_preset(args.preset)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [preset.seed]
    for flag in ("threads", "jobs"):
        positive_int(getattr(args, flag), f"--{flag}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    failed: list[str] = []

    def run_one(out: str | Path, seed: int) -> dict[str, Any]:
        demo = Demo(out, dataclasses.replace(preset, seed=seed), device=resolve_device(args.device),
                    vlm=not args.no_vlm, threads=args.threads)
        if args.worker is not None:
            run, _, worker = args.worker.rpartition("/")
            demo.run_id, demo.worker = run, int(worker)
            exit_with_parent()
        summary = demo.run(only=args.only, jobs=args.jobs, report=not args.no_report)
        failed.extend(f"{name} (seed {seed})" if len(seeds) > 1 else name for name in demo.failed)
        return summary

    try:
        if len(seeds) == 1:
            summary = run_one(args.out, seeds[0])
        else:
            report = run_seeds(args.out, seeds, run_one, preset)
            results = str(Path(args.out) / "results.json")
            summary = {"report": str(report), "results": results, "failed": failed}
    except KeyboardInterrupt:
        print(
            "\n[demo] interrupted; run the same command again to continue where it stopped", file=sys.stderr
        )
        return 130
    if summary:
        print(json.dumps(summary))
    if failed:
        print(f"[demo] stages that failed: {', '.join(failed)}; fix and rerun to finish them",
              file=sys.stderr)
        return 1
    return 0

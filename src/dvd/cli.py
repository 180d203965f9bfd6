"""The ``dvd`` command: one subcommand per job, each owned by the module that does the work.

This file only dispatches; every job parses its own arguments in ``cli(argv)`` so that
``dvd <group> <job> --help`` documents exactly what that job takes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from dvd.config import ConfigError, suggest

# command words -> (module, what it does)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("dvd.demo", "the whole paper on ShapesWorld on a CPU, with a report"),
    ("data", "shapesworld"): ("dvd.data.shapesworld", "write the ShapesWorld image-text world to disk"),
    ("train", "clip"): ("dvd.train.clip", "ΔCLIP / clean CLIP / TeCoA / FARE training"),
    ("train", "vlm"): ("dvd.train.vlm", "LLaVA-style training, clean or Δ² adversarial"),
    ("train", "lm"): ("dvd.train.lm", "text-only training of a LLaVA's language model"),
    ("eval", "zeroshot"): ("dvd.eval.zeroshot", "zero-shot classification, clean and under attack"),
    ("eval", "retrieval"): ("dvd.eval.retrieval", "image-text retrieval recall@k, clean and under attack"),
    ("eval", "caption"): ("dvd.eval.captioning", "captioning CIDEr, clean and under attack"),
    ("eval", "vqa"): ("dvd.eval.vqa", "VQA accuracy, clean and under attack"),
    ("eval", "pope"): ("dvd.eval.pope", "POPE hallucination metrics"),
    ("eval", "targeted"): ("dvd.eval.targeted", "targeted attacks on a VLM's output"),
    ("eval", "scienceqa"): ("dvd.eval.scienceqa", "ScienceQA accuracy, clean and under attack"),
    ("eval", "mme"): ("dvd.eval.mme", "MME yes/no perception and cognition scores"),
    ("attack",): ("dvd.eval.attack_images", "attack given images and save the adversarial PNGs"),
}


def usage(commands: dict[tuple[str, ...], tuple[str, str]]) -> str:
    lines = ["usage: dvd <command> [options]   (dvd <command> --help for its options)", "", "commands:"]
    for words, (_, help_text) in commands.items():
        lines.append(f"  {' '.join(words):<18} {help_text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dvd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = COMMANDS
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(commands))
        return 0
    if argv[0] in ("-V", "--version"):
        from dvd import __version__

        print(f"dvd {__version__}")
        return 0
    for words, (module_name, _) in commands.items():
        if tuple(argv[: len(words)]) == words:
            module = importlib.import_module(module_name)
            from dvd.onednn_linear import onednn_linear  # imports torch: not for `dvd --help`

            try:
                with onednn_linear():  # fp32 CPU linear layers through oneDNN (DVD_ONEDNN_LINEAR=0: not)
                    return int(module.cli(argv[len(words) :]) or 0)
            except (ConfigError, ValueError, FileNotFoundError) as error:
                print(f"dvd: error: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("dvd: interrupted; rerun the same command to continue", file=sys.stderr)
                return 130
    group = {words: entry for words, entry in commands.items() if len(words) > 1 and words[0] == argv[0]}
    if group and (len(argv) == 1 or argv[1] in ("-h", "--help", "help")):  # e.g. dvd eval --help
        text = usage(group).replace("<command>", f"{argv[0]} <command>", 1)
        print(text, file=sys.stdout if argv[1:] else sys.stderr)
        return 0 if argv[1:] else 2
    given = " ".join(argv[:2])
    names = [" ".join(w) for w in commands]
    print(f"dvd: error: unknown command {given!r}{suggest(given, names)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

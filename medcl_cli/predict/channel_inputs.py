"""The inputs of `medcl predict` for a run trained on several channels (multi-sequence MR).

One output per case; a case is one file per channel, matched the way `ingest --channels` matches them
(data/channels.py, data/channels_nifti.py):
- files given on the command line: grouped into cases by their names (`<case>_0000..`, `<case>_<name>`,
  `<case-folder>/<name>`); when they do not group into complete cases but their number equals the run's
  channel count, they are one case: files whose name matches a channel go there, the others fill the
  remaining channels in the order given (`medcl predict RUN t1.nii.gz flair.nii.gz t2.nii.gz`). Any other
  count is refused (exit 2) with the run's channel names.
- folders of volumes: grouped the same way; an incomplete case is reported as failed, the others run.
- DICOM folders: the series of each study matched on SeriesDescription; the output is named after
  channel 0's series (pseudonymous, like single-channel DICOM inputs).
Each input loads as one image of C components on channel 0's grid (`stack_channels`), so the mask lands
on the grid of the first channel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from medcl_cli.core.report import NullReporter, Reporter
from medcl_cli.data.channels import assign_channels, best_matches, stack_channels
from medcl_cli.data.channels_nifti import classify, group_channel_files, pick_files
from medcl_cli.data.io import is_volume_file, strip_suffix
from medcl_cli.errors import InputNotFoundError, UsageError
from medcl_cli.predict.inputs import check_unique, load_volume
from medcl_cli.predict.item import PredictInput


def _loader(paths: list[Path], channels: list[str], info: dict[str, Any]) -> Callable[[], sitk.Image]:
    def load() -> sitk.Image:
        info.pop("nonfinite_replaced", None)
        image, _ = stack_channels([load_volume(p, info, ch) for p, ch in zip(paths, channels)])
        return image

    return load


def _volume_case(name: str, paths: list[Path], channels: list[str]) -> PredictInput:
    info: dict[str, Any] = {"channels": {ch: str(p) for ch, p in zip(channels, paths)}}  # each path as given
    return PredictInput(
        name=name, kind="volume", files=list(paths), load=_loader(paths, channels, info),
        display=" + ".join(p.name for p in paths), given=str(paths[0]), info=info,
    )


def order_files(files: list[Path], channels: list[str]) -> list[Path]:
    """Exactly one file per channel: files whose name matches one channel (and no other) go there, the
    others fill the remaining channels in the order given."""
    stems = [strip_suffix(f.name) for f in files]
    slot: dict[int, int] = {}
    for k, ch in enumerate(channels):
        hits = [i for i in best_matches(ch, stems) if i not in slot.values()]
        if len(hits) == 1 and sum(1 for c in channels if hits[0] in best_matches(c, stems)) == 1:
            slot[k] = hits[0]
    rest = iter(i for i in range(len(files)) if i not in slot.values())
    return [files[slot[k]] if k in slot else files[next(rest)] for k in range(len(channels))]


def collect_channel_inputs(
    paths: list[Path], channels: list[str], workdir: Path, reporter: Reporter | None = None,
    exclude: Path | None = None, label_series: str | None = None, skipped: list[str] | None = None,
) -> tuple[list[PredictInput], list[tuple[str, str]]]:
    """(one input per multi-channel case, (source, reason) of what failed); see the module docstring. DICOM
    label series (`label_series`) and SEG/RTSTRUCT objects are left out and listed in `skipped`."""
    rep = reporter or NullReporter()
    skip = exclude.resolve() if exclude is not None else None
    failed: list[tuple[str, str]] = []
    direct: list[Path] = []
    folder_vols: list[Path] = []
    dicom_roots: list[Path] = []
    for p in paths:
        if not p.exists():
            failed.append((str(p), "not found"))
        elif p.is_file():
            (direct if is_volume_file(p) else dicom_roots).append(p)
        else:
            vols = sorted(q for q in p.rglob("*") if is_volume_file(q) and not q.name.startswith(".tmp-")
                          and not (skip is not None and q.resolve().is_relative_to(skip)))
            folder_vols.extend(vols)
            if not vols:
                dicom_roots.append(p)
    found: list[PredictInput] = []
    if direct:
        found.extend(_direct_cases(direct, channels, rep))
    for name, files in group_channel_files(folder_vols, channels).items():
        picked, why = pick_files(files, channels)
        if picked is None:
            failed.append((str(files[0].path.parent), f"case {name}: {why}"))
        else:
            found.append(_volume_case(name, [f.path for f in picked], channels))
    if dicom_roots:
        dic, dic_failed = _dicom_cases(dicom_roots, channels, workdir, rep, label_series, skipped)
        found.extend(dic)
        failed.extend(dic_failed)
    check_unique(found)
    return found, failed


def _direct_cases(files: list[Path], channels: list[str], rep: Reporter) -> list[PredictInput]:
    groups = group_channel_files(files, channels)
    picks = {name: pick_files(fs, channels)[0] for name, fs in groups.items()}
    if all(p is not None for p in picks.values()):
        return [_volume_case(name, [f.path for f in p], channels) for name, p in picks.items() if p is not None]
    if len(files) != len(channels):
        raise UsageError(
            f"the run was trained on {len(channels)} channels ({', '.join(channels)}); "
            f"{len(files)} file(s) were given ({', '.join(f.name for f in files[:6])})",
            f"give one file per channel, e.g. medcl predict RUN {' '.join(c.lower() + '.nii.gz' for c in channels)} "
            "(matched by name, else in that order), or a folder of <case>_0000.. files",
        )
    ordered = order_files(files, channels)
    rep.log("channels: " + ", ".join(f"{ch} <- {p.name}" for ch, p in zip(channels, ordered)))
    name = classify(ordered[0], channels).case
    return [_volume_case(name, ordered, channels)]


def _dicom_cases(roots: list[Path], channels: list[str], workdir: Path, rep: Reporter,
                 label_series: str | None = None, skipped: list[str] | None = None,
                 ) -> tuple[list[PredictInput], list[tuple[str, str]]]:
    """One input per study whose series match every channel (on SeriesDescription); label series are not
    candidates."""
    from medcl_cli.predict.dicom_inputs import dicom_inputs

    left_out: list[str] = []
    series, failed = dicom_inputs(roots, workdir, rep, label_series, left_out)
    if skipped is not None:
        skipped.extend(left_out)
    studies: dict[str, list[PredictInput]] = {}
    for s in series:
        studies.setdefault(s.study, []).append(s)
    found: list[PredictInput] = []
    for items in studies.values():
        descs = [i.description for i in items]
        picks, why = assign_channels(channels, descs)
        if picks is None:
            failed.append((items[0].display, f"study of {len(items)} series: {why}"))
            continue
        chosen = [items[i] for i in picks]
        loaders = [c.load for c in chosen]

        def load(loaders: list[Callable[[], sitk.Image]] = loaders) -> sitk.Image:
            return stack_channels([f() for f in loaders])[0]

        first = chosen[0]
        found.append(PredictInput(
            name=first.name, kind="dicom", files=[f for c in chosen for f in c.files], load=load,
            display=first.display, frames=first.frames, given=first.given, pseudonym=first.pseudonym,
            info={**first.info, "channels": {ch: c.display for ch, c in zip(channels, chosen)}},
        ))
    if not found and not failed and not left_out:
        raise InputNotFoundError(f"no DICOM image series in {', '.join(map(str, roots))}", "check the folders")
    return found, failed

"""What `msit-rec export` prints: the tables as stored and the parity figures."""

from __future__ import annotations

from msit_rec.export.parity import describe_parity
from msit_rec.serving.contract import Manifest


def export_summary(manifest: Manifest) -> str:
    header = f"{'table':<16} {'rows':>10} {'dim':>4} {'precision':>9} {'bytes':>12} {'fp32 bytes':>12}"
    lines = [header, "-" * len(header)]
    for t in manifest.tables:
        lines.append(f"{t.name:<16} {t.rows:>10,} {t.dim:>4} {t.precision:>9} {t.bytes:>12,} {t.fp32_bytes:>12,}")
    programs = ", ".join(name for name in manifest.files if name.endswith(".pt2"))
    lines.append(f"programs: {programs} ({manifest.model.variant}, {manifest.compute} dense products, dataset "
                 f"{manifest.dataset_hash[:12]})")
    if manifest.parity is not None:
        lines.append(describe_parity(manifest.parity))
    lines += [f"note: {note}" for note in manifest.notes]
    return "\n".join(lines)

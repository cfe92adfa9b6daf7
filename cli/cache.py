"""`lowbit cache`: list, trim or clear a quantize-on-load cache folder (ComfyUI: models/lowbit_cache)."""
import os
import time

from .quantize import gb


def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="list, trim or clear a quantize-on-load cache folder",
                       description="The quantized models ComfyUI's quantize-on-load nodes keep (models/lowbit_cache): "
                                   "one line per entry, least recently used first. Only the cache's own files (lowbit "
                                   "checkpoints carrying a cache key) are ever removed.")
    c.add_argument("folder", help="the cache folder, e.g. ComfyUI/models/lowbit_cache")
    c.add_argument("--clear", action="store_true", help="remove every entry")
    c.add_argument("--limit", type=float, default=None, metavar="GB",
                   help="remove least recently used entries until the cache takes at most GB (1e9 bytes)")
    c.set_defaults(run=run_cache)


def run_cache(args) -> int:
    from ..checkpoint import QuantCache

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"{args.folder}: no such folder")
    if args.clear and args.limit is not None:
        raise ValueError("give --clear or --limit, not both")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0 GB, got {args.limit}")
    cache = QuantCache(args.folder)
    if args.clear:
        gone = cache.clear()
        print(f"{args.folder}: removed {len(gone)} entries, {gb(sum(e.size for e in gone))}")
        return 0
    if args.limit is not None:
        entries, gone = cache.entries(), []
        used = sum(e.size for e in entries)
        while entries and used > args.limit * 1e9:
            e = entries.pop(0)
            cache.discard(e.path)
            used -= e.size
            gone.append(e)
        print(f"{args.folder}: removed {len(gone)} entries, {gb(sum(e.size for e in gone))}; {gb(used)} left")
        return 0
    entries = cache.entries()
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
        print(f"{gb(e.size):>10}  {when}  {os.path.basename(e.path)}  (from {e.source})")
    print(f"{len(entries)} entries, {gb(sum(e.size for e in entries))} in {cache.folder}")
    return 0

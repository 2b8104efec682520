"""Move a keyspace of the earlier single-node layout to today's (gateway/core/redisnames.py).

    python -m gateway.keys.migrate                 # in place, on the Redis the gateway uses
    python -m gateway.keys.migrate --from URL      # copy from an old single node into the Redis
                                                   # the gateway's settings name (a cluster too)
    ... --dry-run                                  # count what would move, change nothing

What changes: the record `key:<token>` becomes `key:{token}` and `gone:<token>` becomes
`gone:{token}` (so each key's names share a cluster slot); the old index `keys` is replaced by
the listing indexes (gateway/keys/index.py), rebuilt from the records. Every other name (spend,
limits, spend log, audit, end-user stats, aliases) is already right and is copied as it is.

Nothing is lost or counted twice: in place, each name moves with RENAMENX (atomic; a name the
new layout already has is kept); across servers, each name is copied with DUMP/RESTORE and its
remaining lifetime, and never over one the target already has. So the command can be run again
after an interruption. Run it while no gateway writes to the old layout: stop the gateways, or
keep them on the old Redis until it has finished. It ends with a check (records and the sum of
spend on both sides) and exits 1 if they differ.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import redis

from gateway.core.redisnames import RedisNames
from gateway.keys.index import KeyIndex
from gateway.usage.money import as_json, stored_nanos

_OLD_NAME = re.compile(r"(key|gone):([0-9a-f]{64})")
SCAN_COUNT = 1000


def scan(client, pattern: str):
    """Every name matching `pattern` (on a cluster: on every primary)."""
    return client.scan_iter(match=pattern, count=SCAN_COUNT)


def renamed(names: RedisNames, name: str) -> str | None:
    """The new name of an old-layout name, None when the name is unchanged; "" to drop it."""
    rest = name[len(names.prefix):]
    if rest == "keys":
        return ""  # the old index: rebuilt from the records
    match = _OLD_NAME.fullmatch(rest)
    if match is None:
        return None
    kind, token = match.groups()
    return names.record(token) if kind == "key" else names.gone(token)


class Migration:
    def __init__(self, source, target, prefix: str, out=sys.stdout):
        self.source = source
        self.target = target
        self.in_place = source is target
        self.names = RedisNames(prefix)
        self.out = out
        self.moved = self.kept = self.dropped = 0

    def run(self, dry_run: bool = False) -> bool:
        for name in list(scan(self.source, self.names.prefix + "*")):
            new = renamed(self.names, name)
            if new == "":  # the old index: not copied, and removed in place once replaced
                self.dropped += 1
                if self.in_place and not dry_run:
                    self.source.delete(name)
            elif new is None and self.in_place:
                continue  # already where it belongs
            elif dry_run:
                self.moved += 1
            else:
                self._move(name, new or name)
        if not dry_run:
            self._rebuild_indexes()
        self._say(f"{'would move' if dry_run else 'moved'} {self.moved} names, kept {self.kept} the target "
                  f"already had, dropped {self.dropped} old index(es)")
        return dry_run or self.verify()

    def _move(self, old: str, new: str) -> None:
        if self.in_place:
            if self.source.renamenx(old, new):
                self.moved += 1
            else:  # the new layout has it already (written since): the old copy is stale
                self.source.delete(old)
                self.kept += 1
            return
        dumped = self.source.dump(old)
        if dumped is None:
            return  # expired meanwhile
        ttl = self.source.pttl(old)
        try:
            self.target.restore(new, max(ttl, 0), dumped)
            self.moved += 1
        except redis.exceptions.ResponseError as exc:
            if "BUSYKEY" not in str(exc):
                raise
            self.kept += 1

    def _rebuild_indexes(self) -> None:
        index = KeyIndex(self.target, self.names)
        pipe = self.target.pipeline(transaction=False)
        queued = 0
        for name in scan(self.target, self.names.prefix + "key:{*}"):
            raw = self.target.get(name)
            if raw:
                index.add(pipe, json.loads(raw))
                queued += 1
            if queued % 500 == 499:
                pipe.execute()
        pipe.set(self.names.keys_by_alias_built, "1")  # every key is in the alias search now
        pipe.execute()

    def verify(self) -> bool:
        """Records and total spend on both sides agree (names that expired meanwhile aside)."""
        source_names = (n[len(self.names.prefix):] for n in scan(self.source, self.names.prefix + "key:*"))
        old_records = sum(1 for n in source_names if not self.in_place or _OLD_NAME.fullmatch(n))
        new_records = sum(1 for _ in scan(self.target, self.names.prefix + "key:{*}"))
        source_spend = total_spend(self.source, self.names)
        target_spend = total_spend(self.target, self.names)
        if self.in_place:
            ok = old_records == 0
            self._say(f"check: {new_records} keys in the new layout, {old_records} left in the old one; "
                      f"total spend {target_spend:.6f}")
        else:
            ok = new_records >= old_records and abs(source_spend - target_spend) < 1e-6
            self._say(f"check: {old_records} keys on the source, {new_records} on the target; total spend "
                      f"{source_spend:.6f} on the source, {target_spend:.6f} on the target")
        if not ok:
            self._say("MISMATCH: run the command again (it only moves what is missing)")
        return ok

    def _say(self, text: str) -> None:
        print(text, file=self.out)


def total_spend(client, names: RedisNames) -> float:
    """Every key's all-time spend, in dollars: integer nano-dollars, plus what a float field of
    the previous version still holds (gateway/usage/money.py)."""
    nanos = sum(stored_nanos(*client.hmget(name, "spend_nanos", "spend"))
                for name in scan(client, names.prefix + "spend:*"))
    return as_json(nanos)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.keys.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", metavar="URL",
                        help="an old single-node Redis to copy from (default: migrate in place)")
    parser.add_argument("--prefix", help="key prefix (default: REDIS_KEY_PREFIX, else vgw:)")
    parser.add_argument("--dry-run", action="store_true", help="count what would move; change nothing")
    args = parser.parse_args(argv)

    from gateway.core.config import ConfigError, load_settings
    from gateway.core.redisconn import make_redis
    # Only the Redis settings matter here: the gateway's other required ones get stand-ins.
    environ = {"HOSTED_VLLM_API_BASE": "http://127.0.0.1:9", "LITELLM_MASTER_KEY": "sk-migration-needs-none",
               **os.environ}
    try:
        settings = load_settings(environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.redis_url:
        print("REDIS_URL is not set: nothing to migrate (the in-process store keeps nothing)", file=sys.stderr)
        return 2
    target = make_redis(settings)
    source = redis.Redis.from_url(args.source, decode_responses=True) if args.source else target
    migration = Migration(source, target, args.prefix or settings.redis_prefix)
    return 0 if migration.run(dry_run=args.dry_run) else 1


if __name__ == "__main__":
    sys.exit(main())

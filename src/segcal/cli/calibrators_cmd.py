"""``segcal calibrators``: list the registered calibrators, their aliases and guarantees."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrators", help="list calibrators (names, aliases, TI / AP / OP)",
                       description="List every registered calibrator with its aliases, declared "
                       "properties (TI: translation invariant, AP: argmax-preserving, OP: "
                       "order-preserving) and the methods.md section it implements.")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from segcal.calibrators import available

    rows = available()
    yn = {True: "yes", False: "no"}
    header = ("name", "aliases", "TI", "AP", "OP", "section", "description")
    table = [header] + [
        (r["name"], ", ".join(r["aliases"]), yn[r["translation_invariant"]], yn[r["argmax_preserving"]],
         yn[r["order_preserving"]], r["section"], r["description"])
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return 0

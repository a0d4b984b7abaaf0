"""Every entity table of the orderbook subgraph, derived from a Dataset as the subgraph's mappings would.

``OrderFilledEvent``, ``OrdersMatchedEvent`` and ``MarketData`` never change once written, so a query
pinned at a block filters them by their block. ``Orderbook`` and ``OrdersMatchedGlobal`` are aggregates
updated by every fill/match, so at a pinned block they are recomputed from the fills up to that block.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

import numpy as np

from clobjob.sim.columns import CodeColumn, IdColumn, IntColumn, NullColumn
from clobjob.sim.data import Dataset, block_of
from clobjob.sim.table import BLOCK, Pred, Table

MUTABLE = ("Orderbook", "OrdersMatchedGlobal")


def _ids(sorted_ids: list[str]) -> IdColumn:
    table = np.array(sorted_ids, dtype=object)
    return IdColumn(len(sorted_ids), lambda rows: table[rows].tolist())


def _codes(table: Table, name: str) -> CodeColumn:
    column = table.columns[name]
    assert isinstance(column, CodeColumn)
    return column


def _ints(table: Table, name: str) -> IntColumn:
    column = table.columns[name]
    assert isinstance(column, IntColumn)
    return column


class EntityStore:
    """The entity tables of one dataset; ``at`` serves them at the head or at a pinned block."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self._aggregates = lru_cache(maxsize=4)(self._aggregates_at)

    @cached_property
    def _immutable(self) -> dict[str, Table]:
        return {
            "OrderFilledEvent": self.ds.fills,
            "OrdersMatchedEvent": self._matches(),
            "MarketData": self._market_data(),
        }

    def at(self, entity: str, block: int | None) -> tuple[Table, list[Pred]]:
        """The table of ``entity`` at ``block`` (None = head) and the predicates that pin its rows."""
        if entity in MUTABLE:
            return self._aggregates(block)[entity], []
        return self._immutable[entity], [] if block is None else [(BLOCK, "lte", block)]

    @cached_property
    def _relay_rows(self) -> np.ndarray:
        """Fill rows of taker orders (taker = an exchange, address code 0 or 1): one per match."""
        return np.flatnonzero(_codes(self.ds.fills, "taker").codes < 2)

    @cached_property
    def _fill_ts(self) -> np.ndarray:
        return _ints(self.ds.fills, "timestamp").values

    def _matches(self) -> Table:
        fills, rows = self.ds.fills, self._relay_rows
        tx_hash = fills.columns["transactionHash"]
        numeric = [int(a) for a in self.ds.assets]
        ids = fills.ids
        assert ids.prefix is not None
        columns = {
            "id": IdColumn(len(rows), lambda r: tx_hash.render(rows[r]), prefix=ids.prefix[rows]),
            "timestamp": _ints(fills, "timestamp").take(rows),
            "makerAssetID": CodeColumn(_codes(fills, "makerAssetId").codes[rows], numeric),
            "takerAssetID": CodeColumn(_codes(fills, "takerAssetId").codes[rows], numeric),
            "makerAmountFilled": _ints(fills, "makerAmountFilled").take(rows),
            "takerAmountFilled": _ints(fills, "takerAmountFilled").take(rows),
        }
        return Table("OrdersMatchedEvent", columns, blocks=lambda: block_of(self._fill_ts[rows]))

    def _market_data(self) -> Table:
        ds = self.ds
        codes = sorted((1 + 2 * m + o for m in np.flatnonzero(ds.known).tolist() for o in (0, 1)),
                       key=ds.assets.__getitem__)
        market = (np.array(codes, dtype=np.int64) - 1) // 2
        columns = {
            "id": _ids([ds.assets[c] for c in codes]),
            "condition": CodeColumn(market.astype(np.int32), [m["conditionId"] for m in ds.markets]),
            "outcomeIndex": NullColumn(),
        }
        return Table("MarketData", columns, blocks=lambda: block_of(ds.created[market]))

    def _aggregates_at(self, block: int | None) -> dict[str, Table]:
        rows = np.arange(self.ds.n_fills)
        if block is not None:
            rows = rows[block_of(self._fill_ts) <= block]
        return {"Orderbook": self._orderbooks(rows), "OrdersMatchedGlobal": self._global(rows)}

    def _orderbooks(self, rows: np.ndarray) -> Table:
        """Per token, as ``handleFill`` accumulates: counts and USDC volume of buys and sells."""
        fills, size = self.ds.fills, len(self.ds.assets)
        token = self.ds.token_codes(rows)
        buy = _codes(fills, "makerAssetId").codes[rows] == 0
        buys = _ints(fills, "makerAmountFilled").group_sums(rows[buy], token[buy], size)
        sells = _ints(fills, "takerAmountFilled").group_sums(rows[~buy], token[~buy], size)
        trades = np.bincount(token, minlength=size)
        last_ts = np.zeros(size, dtype=np.int64)
        np.maximum.at(last_ts, token, self._fill_ts[rows])
        present = sorted(np.flatnonzero(trades).tolist(), key=self.ds.assets.__getitem__)
        buy_volume = [buys[c] for c in present]
        sell_volume = [sells[c] for c in present]
        volume = [b + s for b, s in zip(buy_volume, sell_volume, strict=True)]
        columns = {
            "id": _ids([self.ds.assets[c] for c in present]),
            "tradesQuantity": IntColumn(trades[present]),
            "buysQuantity": IntColumn(np.bincount(token[buy], minlength=size)[present]),
            "sellsQuantity": IntColumn(np.bincount(token[~buy], minlength=size)[present]),
            **_volumes(volume, buy_volume, sell_volume, "BigInt"),
        }
        return Table("Orderbook", columns, blocks=lambda: block_of(last_ts[present]))

    def _global(self, rows: np.ndarray) -> Table:
        """The singleton ``""`` as ``handleMatch`` accumulates it (its "volume" is the taker order's shares)."""
        fills = self.ds.fills
        rows = rows[np.isin(rows, self._relay_rows)]
        buy = _codes(fills, "makerAssetId").codes[rows] == 0
        zero = np.zeros(len(rows), dtype=np.int64)
        [buy_volume] = _ints(fills, "takerAmountFilled").group_sums(rows[buy], zero[buy], 1)
        [sell_volume] = _ints(fills, "makerAmountFilled").group_sums(rows[~buy], zero[~buy], 1)
        n = min(len(rows), 1)  # the singleton exists once the first match is handled

        def single(value: int) -> IntColumn:
            return IntColumn.from_ints([value][:n])

        columns = {
            "id": _ids([""][:n]),
            "tradesQuantity": single(len(rows)),
            "buysQuantity": single(int(buy.sum())),
            "sellsQuantity": single(int((~buy).sum())),
            **_volumes([buy_volume + sell_volume][:n], [buy_volume][:n], [sell_volume][:n], "BigDecimal"),
        }
        last = int(self._fill_ts[rows].max()) if n else 0
        return Table("OrdersMatchedGlobal", columns, blocks=lambda: block_of(np.full(n, last)))


def _volumes(total: list[int], buy: list[int], sell: list[int], kind: str) -> dict[str, IntColumn]:
    """The collateral volume columns: raw units (``kind``) and ``scaled*`` BigDecimals (units / 10^6)."""
    out = {}
    for name, values in (("collateralVolume", total), ("collateralBuyVolume", buy), ("collateralSellVolume", sell)):
        out[name] = IntColumn.from_ints(values, kind=kind)
        out["scaled" + name[0].upper() + name[1:]] = IntColumn.from_ints(values, kind="BigDecimal", scale=6)
    return out

"""A deterministic, Polymarket-shaped market universe and its CLOB v1 fills, stored columnar.

Everything derives from one seed (numpy ``Generator``). Fills are numpy columns in ascending ``id``
order; hashes and addresses are not stored but recomputed on demand from (kind, index) with a keyed
splitmix64, so millions of fills cost ~56 bytes each. Shape of the data (see ``_fill_counts``):
many markets without fills, most with a few, a few with 10^4-10^5; bursts of thousands of fills in one
second; matches of one taker order against several maker orders in one transaction, with the taker's own
"relay" leg whose ``taker`` is the exchange contract; maker-side (SELL) and taker-side (BUY) fills,
complementary matches on the sibling token, fees, and rare amounts above 2^64.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from clobjob.models import EXCHANGES, USDC_ASSET_ID
from clobjob.sim.columns import I64_MAX, BytesColumn, CodeColumn, IdColumn, IntColumn
from clobjob.sim.schema import ENTITIES
from clobjob.sim.table import Table

HEAD_TS = int(datetime(2026, 4, 28, 11, tzinfo=UTC).timestamp())  # last v1 fill; the subgraph's head
HEAD_BLOCK = 85_980_000  # Polygon, ~2 s per block
_CTF_FROM = int(datetime(2022, 1, 1, tzinfo=UTC).timestamp())
_NEGRISK_FROM = int(datetime(2023, 11, 15, tzinfo=UTC).timestamp())
_DAY = 86_400
# The v1 exchanges, in EXCHANGES' order: CTF Exchange, then NegRisk Exchange (address code 0 and 1).
CTF_EXCHANGE, NEGRISK_EXCHANGE = (address for address, version in EXCHANGES.items() if version == 1)
FILL_FIELDS = tuple(ENTITIES["OrderFilledEvent"])

_TX, _ORDER, _ADDRESS, _BLOCK = range(4)  # hash kinds
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def block_of(ts: np.ndarray) -> np.ndarray:
    """The block number of timestamps (2 s blocks ending at HEAD_BLOCK at HEAD_TS)."""
    return HEAD_BLOCK - (HEAD_TS - ts) // 2


def block_timestamp(number: int | np.ndarray) -> int | np.ndarray:
    """The timestamp of a block number (or of each)."""
    return HEAD_TS - 2 * (HEAD_BLOCK - number)


def hash_words(key: int, kind: int, idx: np.ndarray, words: int = 4) -> np.ndarray:
    """Pseudo-random uint64 words per index (4 words = a 32-byte hash), distinct for every (kind, index)."""
    x = (idx.astype(np.uint64)[:, None] << np.uint64(4)) | np.uint64(kind << 2) | np.arange(words, dtype=np.uint64)
    z = (x ^ np.uint64(key)) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def block_hash(key: int, number: int) -> str:
    """The (simulated) hash of a block."""
    return "0x" + hash_words(key, _BLOCK, np.array([number])).astype(">u8").tobytes().hex()


@dataclass
class _Universe:
    created: np.ndarray  # per market: creation timestamp (markets are in creation order)
    end: np.ndarray  # endDate timestamp
    neg_risk: np.ndarray
    known: np.ndarray  # the subgraph knows the market (MarketData, Orderbook, fills)
    counts: np.ndarray  # fills


def _universe(rng: np.random.Generator, n: int, top_fills: int | None) -> _Universe:
    neg_risk = rng.random(n) < 0.3
    start = np.where(neg_risk, _NEGRISK_FROM, _CTF_FROM)
    created = start + (rng.random(n) * (HEAD_TS - _DAY - start)).astype(np.int64)
    order = np.argsort(created, kind="stable")
    created, neg_risk = created[order], neg_risk[order]
    end = created + np.exp(rng.normal(np.log(20 * _DAY), 1.0, n)).astype(np.int64) + 3600
    known = rng.random(n) >= 0.04
    return _Universe(created, end, neg_risk, known, _fill_counts(rng, known, top_fills))


def _fill_counts(rng: np.random.Generator, known: np.ndarray, top_fills: int | None) -> np.ndarray:
    """Heavy-tailed fills per market: 45% none, a lognormal body, and a few whales scaling with N;
    ``top_fills`` makes the largest whale exactly that big (a benchmark's giant market)."""
    n = len(known)
    counts = np.floor(np.exp(rng.normal(1.6, 1.5, n))).astype(np.int64)
    counts[rng.random(n) < 0.45] = 0
    top = int(np.clip(50 * n, 2_000, 100_000))
    candidates = np.flatnonzero(known)
    whales = rng.choice(candidates, size=min(int(np.clip(n // 400, 1, 25)), len(candidates)), replace=False)
    counts[whales] = np.exp(rng.uniform(np.log(top / 5), np.log(top), len(whales))).astype(np.int64)
    if top_fills is not None:
        counts[whales[0]] = top_fills
    counts[~known] = 0
    return counts


def _wallet_draw(rng: np.random.Generator, size: int, wallets: int, perm: np.ndarray) -> np.ndarray:
    """Wallet indexes with a power-law activity (the top 0.1% of wallets make ~10% of the fills)."""
    return perm[(wallets * rng.random(size) ** 3).astype(np.int64)]


def _with_overrides(values: np.ndarray, overrides: dict[int, int], order: np.ndarray
                    ) -> tuple[np.ndarray, dict[int, int]]:
    """``values`` permuted into id order, with exact ``overrides``; those beyond int64 go to the big map."""
    values = values.copy()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    big = {}
    for row, value in overrides.items():
        values[row] = min(value, I64_MAX)
        if value >= I64_MAX:
            big[int(inverse[row])] = value
    return values[order], big


def _matches(rng: np.random.Generator, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group each market's fills into matches: per fill its market, its position in the market, and whether
    it starts a match. A match is one transaction: the taker order's own ("relay") fill, then maker fills."""
    total = int(counts.sum())
    market = np.repeat(np.arange(len(counts)), counts)
    in_market = np.arange(total) - (np.cumsum(counts) - counts)[market]
    draw = rng.random(total) < 0.45
    return market, in_market, (draw & ~np.concatenate(([False], draw[:-1]))) | (in_market == 0)


def _timestamps(rng: np.random.Generator, u: _Universe, tx_market: np.ndarray, tx_position: np.ndarray
                ) -> np.ndarray:
    """Per transaction: uniform over its market's life, except a burst of 1,200-5,000 fills in one
    second for markets with 1,500 fills or more (``tx_position``: the index of its first fill)."""
    end = np.minimum(u.end, HEAD_TS)
    ts = u.created[tx_market] + (rng.random(len(tx_market)) * (end - u.created)[tx_market]).astype(np.int64)
    burst_size = np.where(u.counts >= 1_500, np.minimum(u.counts // 2, rng.integers(1_200, 5_000, len(end))), 0)
    burst_at = u.created + (rng.random(len(end)) * (end - u.created)).astype(np.int64)
    return np.where(tx_position < burst_size[tx_market], burst_at[tx_market], ts)


def _fills(rng: np.random.Generator, u: _Universe, key: int, wallets: int) -> dict[str, Any]:
    """Per-fill arrays in ascending id order, plus each market's Gamma volume (USDC of the maker fills)."""
    market, in_market, relay = _matches(rng, u.counts)
    total = len(relay)
    tx = np.cumsum(relay) - 1
    tx_first = np.flatnonzero(relay)
    tx_market = market[tx_first]
    n_tx = len(tx_first)
    ts_tx = block_timestamp(block_of(_timestamps(rng, u, tx_market, in_market[tx_first])))  # a fill's is its block's
    buy_tx = rng.random(n_tx) < 0.5
    outcome_tx = rng.integers(0, 2, n_tx)
    cents_tx = rng.integers(1, 100, n_tx)
    perm = rng.permutation(wallets)
    taker_tx = _wallet_draw(rng, n_tx, wallets, perm)

    complementary = ~relay & (rng.random(total) < 0.25)  # maker order on the sibling token
    buy = buy_tx[tx] ^ (~relay & ~complementary)
    cents = np.where(complementary, 100 - cents_tx[tx], cents_tx[tx])
    shares = np.maximum(1, np.exp(rng.normal(3.5, 1.6, total)) * 1e6).astype(np.int64)
    matched = np.zeros(n_tx, dtype=np.int64)
    np.add.at(matched, tx[~relay], shares[~relay])
    shares = np.where(relay & (matched[tx] > 0), matched[tx], shares)
    usdc = np.maximum(1, shares * cents // 100)
    token = 1 + 2 * market + (outcome_tx[tx] ^ complementary)
    fee = np.where(rng.random(total) < 0.15, usdc * rng.integers(1, 200, total) // 10_000, 0)
    maker = np.where(relay, taker_tx[tx], _wallet_draw(rng, total, wallets, perm)) + 2
    taker = np.where(relay, u.neg_risk[market], taker_tx[tx] + 2)

    maker_amount, taker_amount = np.where(buy, usdc, shares), np.where(buy, shares, usdc)
    huge_maker, huge_taker = {}, {}
    for row in np.flatnonzero(rng.random(total) < 2e-4).tolist():  # rare dust-token amounts above 2**64
        huge = 2**64 + int(rng.integers(0, 2**62))
        usdc_huge = huge * int(cents[row]) // 100
        huge_maker[row], huge_taker[row] = (usdc_huge, huge) if buy[row] else (huge, usdc_huge)

    order = _id_order(key, tx, n_tx)
    maker_values, big_maker = _with_overrides(maker_amount, huge_maker, order)
    taker_values, big_taker = _with_overrides(taker_amount, huge_taker, order)
    return {
        "tx": tx[order].astype(np.uint32),
        "order": order.astype(np.uint32),
        "ts": ts_tx[tx][order],
        "maker": maker[order].astype(np.int32),
        "taker": taker[order].astype(np.int32),
        "maker_asset": np.where(buy, 0, token)[order].astype(np.int32),
        "taker_asset": np.where(buy, token, 0)[order].astype(np.int32),
        "maker_amount": maker_values,
        "big_maker": big_maker,
        "taker_amount": taker_values,
        "big_taker": big_taker,
        "fee": fee[order],
        "volume": np.bincount(market[~relay], weights=usdc[~relay], minlength=len(u.counts)) / 1e6,
    }


def _id_order(key: int, tx: np.ndarray, n_tx: int) -> np.ndarray:
    """The permutation sorting fills by id = tx hash + "_" + order hash, byte-wise.

    Fast path: one uint64 key per fill (the transaction's rank, then the top bits of the order hash),
    exact whenever the leading words leave no tie; otherwise a full lexicographic sort of all words.
    """
    tx_lead = hash_words(key, _TX, np.arange(n_tx), words=1)[:, 0]
    tx_order = np.argsort(tx_lead)
    order_lead = hash_words(key, _ORDER, np.arange(len(tx)), words=1)[:, 0]
    tx_rank = np.empty(n_tx, dtype=np.uint64)
    tx_rank[tx_order] = np.arange(n_tx, dtype=np.uint64)
    shift = np.uint64(max(int(n_tx).bit_length(), 1))
    fill_key = (tx_rank[tx] << np.uint64(64 - int(shift))) | (order_lead >> shift)
    order = np.argsort(fill_key)
    if not (np.any(np.diff(tx_lead[tx_order]) == 0) or np.any(np.diff(fill_key[order]) == 0)):
        return order
    tx_words = hash_words(key, _TX, np.arange(n_tx))
    tx_rank[np.lexsort(tx_words.T[::-1])] = np.arange(n_tx, dtype=np.uint64)
    return np.lexsort((*hash_words(key, _ORDER, np.arange(len(tx))).T[::-1], tx_rank[tx]))


def _hex_list(raw: bytes, width: int, keep: int) -> list[str]:
    text = raw.hex()
    return ["0x" + text[i:i + keep] for i in range(0, len(text), width)]


def _fill_table(key: int, a: dict[str, Any], addresses: list[str], assets: list[str]) -> Table:
    tx_hash = BytesColumn(lambda rows: hash_words(key, _TX, a["tx"][rows]))
    order_hash = BytesColumn(lambda rows: hash_words(key, _ORDER, a["order"][rows]))

    def ids(rows: np.ndarray) -> list[str]:
        return [f"{t}_{o}" for t, o in zip(tx_hash.render(rows), order_hash.render(rows), strict=True)]

    lead = hash_words(key, _TX, a["tx"], words=1)[:, 0]  # ids sort by their first 64 bits first
    columns = {
        "id": IdColumn(len(a["ts"]), ids, prefix=lead, plain=True),
        "transactionHash": tx_hash,
        "timestamp": IntColumn(a["ts"]),
        "orderHash": order_hash,
        "maker": CodeColumn(a["maker"], addresses),
        "taker": CodeColumn(a["taker"], addresses),
        "makerAssetId": CodeColumn(a["maker_asset"], assets),
        "takerAssetId": CodeColumn(a["taker_asset"], assets),
        "makerAmountFilled": IntColumn(a["maker_amount"], a["big_maker"]),
        "takerAmountFilled": IntColumn(a["taker_amount"], a["big_taker"]),
        "fee": IntColumn(a["fee"]),
    }
    return Table("OrderFilledEvent", columns, blocks=lambda: block_of(a["ts"]))


_SUBJECTS = ("Bitcoin", "Ethereum", "Solana", "the Fed", "Trump", "the Lakers", "Real Madrid", "OpenAI",
             "Taylor Swift", "the S&P 500", "Argentina", "SpaceX", "Nvidia", "the Chiefs", "Elon Musk")
_EVENTS = ("reach a new all-time high", "cut interest rates", "win the final", "announce a new product",
           "close above its opening price", "be mentioned in the address", "win the election",
           "release a new model", "hit the target", "top the chart")


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _gamma_markets(rng: np.random.Generator, u: _Universe, tokens: list[str], volume: np.ndarray) -> list[dict]:
    """Markets as the Gamma API lists them (``clobTokenIds``/``outcomes``/``outcomePrices`` JSON-encoded)."""
    n = len(u.counts)
    conditions = rng.bytes(32 * n).hex()
    questions = rng.bytes(32 * n).hex()
    topic = rng.integers(0, len(_SUBJECTS), n) * len(_EVENTS) + rng.integers(0, len(_EVENTS), n)
    cents = rng.integers(1, 100, n)
    winner = rng.integers(0, 2, n)
    archived = rng.random(n) < 0.01
    volume = np.round(np.where(u.known, volume, np.exp(rng.normal(7, 2, n))), 6).tolist()
    ends = u.end.astype("datetime64[s]")
    iso = np.datetime_as_string(ends, unit="s").tolist()
    month = (ends.astype("datetime64[M]").astype(np.int64) % 12).tolist()
    day = ((ends.astype("datetime64[D]") - ends.astype("datetime64[M]")).astype(np.int64) + 1).tolist()
    topics = [f"{subject} {event}" for subject in _SUBJECTS for event in _EVENTS]
    markets = []
    for i in range(n):
        question = f"Will {topics[topic[i]]} by {_MONTHS[month[i]]} {day[i]}?"
        closed = bool(u.end[i] < HEAD_TS)
        if closed:
            prices = ("1", "0") if winner[i] else ("0", "1")
        else:
            prices = (f"{cents[i] / 100:g}", f"{(100 - cents[i]) / 100:g}")
        market = {
            "id": str(500_000 + i),
            "question": question,
            "conditionId": "0x" + conditions[64 * i:64 * i + 64],
            "questionID": "0x" + questions[64 * i:64 * i + 64],
            "slug": f"{_slug(question)}-{i}",
            "endDate": iso[i] + "Z",
            "closed": closed,
            "active": True,
            "archived": bool(archived[i]),
            "negRisk": bool(u.neg_risk[i]),
            "outcomes": '["Yes", "No"]',
            "outcomePrices": f'["{prices[0]}", "{prices[1]}"]',
            "clobTokenIds": f'["{tokens[2 * i]}", "{tokens[2 * i + 1]}"]',
            "volume": str(volume[i]),
            "volumeNum": volume[i],
            "volumeClob": volume[i],
        }
        if closed:
            market["closedTime"] = iso[i].replace("T", " ") + "+00"
        markets.append(market)
    return markets


class DatasetOptions(BaseModel):
    """Everything that shapes a generated dataset: ``sim serve``, ``sim export`` and ``Dataset.generate`` take
    the same options, so the same options always give the same markets and fills."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    markets: int = Field(2000, ge=1, description="simulated markets")
    seed: int = Field(7, description="seed of every generated value")
    top_fills: int | None = Field(None, ge=0, description="make the largest market exactly this many fills")

    def generate(self) -> Dataset:
        """The dataset these options describe."""
        return Dataset.generate(**self.model_dump())


@dataclass(eq=False)
class Dataset:
    """A generated market universe and its fills; ``fills`` is the OrderFilledEvent table."""

    seed: int
    key: int  # hash key for transaction/order/address/block hashes
    markets: list[dict[str, Any]]
    assets: list[str]  # asset code -> id: code 0 is USDC ("0"), code 1 + 2*m + o is outcome o of market m
    known: np.ndarray  # per market: known to the subgraph
    created: np.ndarray  # per market: creation (TokenRegistered) timestamp
    fills: Table

    @classmethod
    def generate(cls, markets: int = 2000, seed: int = 7, top_fills: int | None = None) -> Dataset:
        """Generate ``markets`` markets and their fills, deterministically from ``seed`` (and ``top_fills``)."""
        rng = np.random.default_rng(seed)
        key = int(rng.integers(0, 2**63))
        universe = _universe(rng, markets, top_fills)
        raw_tokens = rng.bytes(64 * markets)
        tokens = [str(int.from_bytes(raw_tokens[i:i + 32], "big")) for i in range(0, len(raw_tokens), 32)]
        wallets = int(np.clip(universe.counts.sum() // 6, 200, 250_000))
        addresses = [CTF_EXCHANGE, NEGRISK_EXCHANGE] + _hex_list(
            hash_words(key, _ADDRESS, np.arange(wallets)).astype(">u8").tobytes(), 64, 40)
        arrays = _fills(rng, universe, key, wallets)
        assets = [USDC_ASSET_ID, *tokens]
        return cls(
            seed=seed,
            key=key,
            markets=_gamma_markets(rng, universe, tokens, arrays["volume"]),
            assets=assets,
            known=universe.known,
            created=universe.created,
            fills=_fill_table(key, arrays, addresses, assets),
        )

    @property
    def n_fills(self) -> int:
        """Total fills (OrderFilledEvent rows)."""
        return self.fills.n

    def token_codes(self, rows: np.ndarray) -> np.ndarray:
        """The outcome-token asset code of each fill row (exactly one side of a fill is USDC, code 0)."""
        maker, taker = self.fills.columns["makerAssetId"], self.fills.columns["takerAssetId"]
        assert isinstance(maker, CodeColumn) and isinstance(taker, CodeColumn)
        return maker.codes[rows] + taker.codes[rows]

    @cached_property
    def token_to_condition(self) -> dict[str, str]:
        """Token id -> condition id, for the markets the subgraph knows."""
        return {
            self.assets[1 + 2 * m + o]: self.markets[m]["conditionId"]
            for m in np.flatnonzero(self.known).tolist()
            for o in (0, 1)
        }

    def trades_quantity(self, token_id: str) -> int:
        """Fills whose maker or taker asset is ``token_id`` (== ``Orderbook.tradesQuantity``)."""
        return sum(self.fills.columns[side].count([token_id]) for side in ("makerAssetId", "takerAssetId"))

    def iter_truth(self, chunk: int = 20_000) -> Iterator[dict[str, Any]]:
        """Every fill in id order, with the API's field names and string values, plus conditionId/tokenId."""
        selection = [(name, name) for name in FILL_FIELDS]
        for start in range(0, self.n_fills, chunk):
            rows = np.arange(start, min(start + chunk, self.n_fills))
            for record, code in zip(self.fills.render(rows, selection), self.token_codes(rows).tolist(),
                                    strict=True):
                record["conditionId"] = self.markets[(code - 1) // 2]["conditionId"]
                record["tokenId"] = self.assets[code]
                yield record

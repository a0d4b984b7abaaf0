"""The GraphQL API schema graph-node generates for the Polymarket orderbook subgraph.

Entities and field types follow Polymarket/polymarket-subgraph ``orderbook-subgraph/schema.graphql``;
the query fields, ``*_filter`` inputs, ``*_orderBy`` enums, ``Block_height`` and ``_meta`` follow
graph-node's API schema generation.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

from graphql import (
    GraphQLSchema,
    IntValueNode,
    StringValueNode,
    ValueNode,
    build_schema,
)

ENTITIES: dict[str, dict[str, str]] = {
    "MarketData": {"id": "ID!", "condition": "String!", "outcomeIndex": "BigInt"},
    "OrderFilledEvent": {
        "id": "ID!",
        "transactionHash": "Bytes!",
        "timestamp": "BigInt!",
        "orderHash": "Bytes!",
        "maker": "String!",
        "taker": "String!",
        "makerAssetId": "String!",
        "takerAssetId": "String!",
        "makerAmountFilled": "BigInt!",
        "takerAmountFilled": "BigInt!",
        "fee": "BigInt!",
    },
    "OrdersMatchedEvent": {
        "id": "ID!",
        "timestamp": "BigInt!",
        "makerAssetID": "BigInt!",
        "takerAssetID": "BigInt!",
        "makerAmountFilled": "BigInt!",
        "takerAmountFilled": "BigInt!",
    },
    "Orderbook": {
        "id": "ID!",
        "tradesQuantity": "BigInt!",
        "buysQuantity": "BigInt!",
        "sellsQuantity": "BigInt!",
        "collateralVolume": "BigInt!",
        "scaledCollateralVolume": "BigDecimal!",
        "collateralBuyVolume": "BigInt!",
        "scaledCollateralBuyVolume": "BigDecimal!",
        "collateralSellVolume": "BigInt!",
        "scaledCollateralSellVolume": "BigDecimal!",
    },
    "OrdersMatchedGlobal": {
        "id": "ID!",
        "tradesQuantity": "BigInt!",
        "buysQuantity": "BigInt!",
        "sellsQuantity": "BigInt!",
        "collateralVolume": "BigDecimal!",
        "scaledCollateralVolume": "BigDecimal!",
        "collateralBuyVolume": "BigDecimal!",
        "scaledCollateralBuyVolume": "BigDecimal!",
        "collateralSellVolume": "BigDecimal!",
        "scaledCollateralSellVolume": "BigDecimal!",
    },
}

_ORDERED = ("not", "gt", "lt", "gte", "lte", "in", "not_in")
_TEXT = tuple(
    f"{neg}{op}{case}"
    for op in ("contains", "starts_with", "ends_with")
    for neg in ("", "not_")
    for case in ("", "_nocase")
)
# Filter operators per scalar (graph-node: ``field``, ``field_<op>``); "" is equality.
FILTER_OPS: dict[str, tuple[str, ...]] = {
    "ID": ("", *_ORDERED),
    "String": ("", *_ORDERED, *_TEXT),
    "Bytes": ("", *_ORDERED, "contains", "not_contains"),
    "BigInt": ("", *_ORDERED),
    "BigDecimal": ("", *_ORDERED),
}
# Suffixes longest first, so ``id_not_in`` splits as (id, not_in), not (id_not, in).
_SUFFIXES = sorted({op for ops in FILTER_OPS.values() for op in ops if op}, key=len, reverse=True)


def plural_field(entity: str) -> str:
    """The collection query field of an entity (``orderFilledEvents``)."""
    return singular_field(entity) + "s"


def singular_field(entity: str) -> str:
    """The single-entity query field of an entity (``orderFilledEvent``)."""
    return entity[0].lower() + entity[1:]


def split_filter_key(key: str, fields: dict[str, Any]) -> tuple[str, str]:
    """``makerAssetId_in`` -> (``makerAssetId``, ``in``); equality keys get op ``""``."""
    if key in fields:
        return key, ""
    for suffix in _SUFFIXES:
        if key.endswith("_" + suffix) and key[: -len(suffix) - 1] in fields:
            return key[: -len(suffix) - 1], suffix
    raise KeyError(key)


def _entity_sdl(entity: str, fields: dict[str, str]) -> str:
    body = "\n".join(f"  {name}: {gql_type}" for name, gql_type in fields.items())
    filters = []
    for name, gql_type in fields.items():
        base = gql_type.rstrip("!")
        for op in FILTER_OPS[base]:
            arg_type = f"[{base}!]" if op in ("in", "not_in") else base
            filters.append(f"  {name}{'_' + op if op else ''}: {arg_type}")
    filters += ["  _change_block: BlockChangedFilter", f"  and: [{entity}_filter]", f"  or: [{entity}_filter]"]
    order = "\n".join(f"  {name}" for name in fields)
    return (
        f"type {entity} {{\n{body}\n}}\n\n"
        f"input {entity}_filter {{\n" + "\n".join(filters) + "\n}\n\n"
        f"enum {entity}_orderBy {{\n{order}\n}}\n"
    )


def _query_sdl() -> str:
    common = "block: Block_height, subgraphError: _SubgraphErrorPolicy_! = deny"
    lines = []
    for entity in ENTITIES:
        lines.append(f"  {singular_field(entity)}(id: ID!, {common}): {entity}")
        lines.append(
            f"  {plural_field(entity)}(skip: Int = 0, first: Int = 100, orderBy: {entity}_orderBy, "
            f"orderDirection: OrderDirection, where: {entity}_filter, {common}): [{entity}!]!"
        )
    lines.append("  _meta(block: Block_height): _Meta_")
    return "type Query {\n" + "\n".join(lines) + "\n}\n"


_PRELUDE = """
scalar BigDecimal
scalar BigInt
scalar Bytes
scalar Int8
scalar Timestamp

enum OrderDirection { asc desc }
enum _SubgraphErrorPolicy_ { allow deny }

input Block_height { hash: Bytes number: Int number_gte: Int }
input BlockChangedFilter { number_gte: Int! }

type _Block_ { hash: Bytes number: Int! timestamp: Int parentHash: Bytes }
type _Meta_ { block: _Block_! deployment: String! hasIndexingErrors: Boolean! }
"""


def sdl() -> str:
    """The full schema as SDL text."""
    return _PRELUDE + "\n".join(_entity_sdl(e, f) for e, f in ENTITIES.items()) + "\n" + _query_sdl()


def _big_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"BigInt expects an integer or a decimal string, got {value!r}")
    return int(value) if isinstance(value, int) else int(value.strip(), 10)


def _big_decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"BigDecimal expects a number or a string, got {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"invalid BigDecimal {value!r}") from exc
    if not result.is_finite():
        raise ValueError(f"invalid BigDecimal {value!r}")
    return result


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"Bytes expects a hex string, got {value!r}")
    return bytes.fromhex(value.removeprefix("0x"))


def _literal(parse: Any) -> Any:
    def parse_literal(node: ValueNode, _variables: Any = None) -> Any:
        if isinstance(node, IntValueNode | StringValueNode):
            return parse(int(node.value) if isinstance(node, IntValueNode) else node.value)
        raise ValueError("expected an Int or String literal")

    return parse_literal


@cache
def build() -> GraphQLSchema:
    """The executable schema, with graph-node's scalar parsing (BigInt/BigDecimal/Bytes/Int8/Timestamp)."""
    schema = build_schema(sdl())
    for name, parse in {"BigInt": _big_int, "BigDecimal": _big_decimal, "Bytes": _bytes,
                        "Int8": _big_int, "Timestamp": _big_int}.items():
        scalar = schema.type_map[name]
        scalar.parse_value = parse  # type: ignore[attr-defined]
        scalar.parse_literal = _literal(parse)  # type: ignore[attr-defined]
        scalar.serialize = str  # type: ignore[attr-defined]
    return schema

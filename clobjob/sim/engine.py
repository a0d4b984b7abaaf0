"""GraphQL requests answered like graph-node (default settings) answers them for the orderbook subgraph.

Each query text is parsed and validated once with graphql-core (cached), with the checks graph-node
makes by default: unknown fields, fragments and types are errors (graph-node's wording), unknown
arguments are ignored, variable types are not checked against their positions, argument values are
coerced per field. Entity fields are then answered from the columnar store, not by graphql-core's
per-field resolvers; introspection queries go to graphql-core.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    BooleanValueNode,
    DocumentNode,
    EnumValueNode,
    FieldNode,
    FloatValueNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLIncludeDirective,
    GraphQLSkipDirective,
    GraphQLSyntaxError,
    InlineFragmentNode,
    IntValueNode,
    ListValueNode,
    NonNullTypeNode,
    NullValueNode,
    ObjectValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionNode,
    SelectionSetNode,
    StringValueNode,
    ValueNode,
    VariableNode,
    execute_sync,
    parse,
    validate,
)
from graphql.execution.values import (
    VariableValues,
    coerce_argument,
    get_directive_values,
    get_variable_values,
)
from graphql.validation import (
    FieldsOnCorrectTypeRule,
    KnownFragmentNamesRule,
    KnownTypeNamesRule,
    NoFragmentCyclesRule,
    VariablesAreInputTypesRule,
)

from clobjob.sim.data import HEAD_BLOCK, Dataset, block_hash, block_timestamp
from clobjob.sim.entities import EntityStore
from clobjob.sim.schema import ENTITIES, build, plural_field, singular_field
from clobjob.sim.table import QueryError, collection

MAX_FIRST = 1000
_CACHE_SIZE = 512
# graph-node's default checks (ENABLE_GRAPHQL_VALIDATIONS off): fields, fragments, variable types.
_RULES = (FieldsOnCorrectTypeRule, KnownFragmentNamesRule, NoFragmentCyclesRule, KnownTypeNamesRule,
          VariablesAreInputTypesRule)
_UNKNOWN_FIELD = re.compile(r"Cannot query field '(.+?)' on type '(.+?)'\.")
_UNKNOWN_FRAGMENT = re.compile(r"Unknown fragment '(.+?)'\.")
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class Json(str):
    """Text that is already JSON (entity lists are encoded column by column, not via dicts)."""


def _encode(value: Any) -> str:
    return value if isinstance(value, Json) else json.dumps(value, separators=(",", ":"))


@dataclass
class Answer:
    """One request's response body (JSON text), HTTP status, and what it served."""

    body: str = "{}"
    status: int = 200
    rows: int = 0  # entity rows returned, of every field
    fills: int = 0  # OrderFilledEvent rows returned
    fill_query: bool = False  # the request queried orderFilledEvents
    in_rows: int = 0  # fills matched by its heaviest `_in` list
    error: bool = False

    @classmethod
    def errors(cls, errors: list[dict[str, Any]], status: int = 200) -> Answer:
        """A response with only ``errors``."""
        return cls(_encode({"errors": errors}), status, error=True)

    @property
    def payload(self) -> dict[str, Any]:
        """The body, decoded."""
        return json.loads(self.body)


@dataclass
class _Context:
    fragments: dict[str, FragmentDefinitionNode]
    variables: VariableValues
    answer: Answer = field(default_factory=Answer)


def deployment_id(seed: int) -> str:
    """A CIDv0-shaped deployment id ("Qm...") derived from the seed."""
    number = int.from_bytes(b"\x12\x20" + hashlib.sha256(f"orderbook-subgraph/{seed}".encode()).digest(), "big")
    digits = ""
    while number:
        number, rest = divmod(number, 58)
        digits = _BASE58[rest] + digits
    return digits


def _debug_json(value: Any) -> str:
    """A coerced variable value as graph-node's Rust ``Debug`` of a query value prints it."""
    match value:
        case None:
            return "Null"
        case bool():
            return f"Boolean({str(value).lower()})"
        case int():
            return f"Int({value})"
        case float():
            return f"Float({value})"
        case list():
            return "List([" + ", ".join(map(_debug_json, value)) + "])"
        case dict():
            return "Object({" + ", ".join(f"{json.dumps(k)}: {_debug_json(v)}" for k, v in sorted(value.items())) + "})"
    return f"String({json.dumps(str(value))})"


def _debug(node: ValueNode, variables: VariableValues) -> str:
    """A literal argument value as graph-node's Rust ``Debug`` prints it."""
    match node:
        case VariableNode():
            return _debug_json(variables.coerced.get(node.name.value))
        case IntValueNode():
            return f"Int({node.value})"
        case FloatValueNode():
            return f"Float({node.value})"
        case StringValueNode():
            return f"String({json.dumps(node.value)})"
        case BooleanValueNode():
            return f"Boolean({str(node.value).lower()})"
        case EnumValueNode():
            return f"Enum({json.dumps(node.value)})"
        case ListValueNode():
            return "List([" + ", ".join(_debug(v, variables) for v in node.values) + "])"
        case ObjectValueNode():
            fields = sorted(node.fields, key=lambda f: f.name.value)
            return "Object({" + ", ".join(f"{json.dumps(f.name.value)}: {_debug(f.value, variables)}"
                                          for f in fields) + "})"
    assert isinstance(node, NullValueNode)
    return "Null"


def _graph_node_error(error: GraphQLError) -> QueryError:
    locations = [{"line": loc.line, "column": loc.column} for loc in error.locations or ()]
    if match := _UNKNOWN_FIELD.match(error.message):
        return QueryError(f"Type `{match[2]}` has no field `{match[1]}`", locations)
    if match := _UNKNOWN_FRAGMENT.match(error.message):
        return QueryError(f"fragment `{match[1]}` is not defined", locations)
    return QueryError(error.message, locations)


class GraphEngine:
    """Answers GraphQL request bodies against one dataset."""

    def __init__(self, ds: Dataset) -> None:
        self.schema = build()
        self.store = EntityStore(ds)
        self.deployment = deployment_id(ds.seed)
        self._key = ds.key
        self._roots = {plural_field(e): (e, True) for e in ENTITIES} | {singular_field(e): (e, False) for e in ENTITIES}
        self._documents: OrderedDict[str, DocumentNode | QueryError] = OrderedDict()
        self.head_block = HEAD_BLOCK  # indexed up to this block: later fills do not exist yet

    def execute(self, body: Any, *, max_skip: int | None = 5000, indexing_error: bool = False) -> Answer:
        """The response to a request body ``{"query", "variables", "operationName"}``."""
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return Answer.errors([{"message": 'The "query" field is missing in request data'}], 400)
        try:
            return self._execute(body, max_skip, indexing_error)
        except QueryError as exc:
            return Answer.errors(exc.errors)

    def _document(self, query: str) -> DocumentNode:
        cached = self._documents.get(query)
        if cached is None:
            try:
                document = parse(query)
                errors = validate(self.schema, document, _RULES)
                cached = QueryError.many([_graph_node_error(e) for e in errors]) if errors else document
            except GraphQLSyntaxError as exc:
                cached = _graph_node_error(exc)
            self._documents[query] = cached
            if len(self._documents) > _CACHE_SIZE:
                self._documents.popitem(last=False)
        else:
            self._documents.move_to_end(query)
        if isinstance(cached, QueryError):
            raise cached
        return cached

    def _execute(self, body: dict[str, Any], max_skip: int | None, indexing_error: bool) -> Answer:
        document = self._document(body["query"])
        inputs = body.get("variables") or {}
        if not isinstance(inputs, dict):
            raise QueryError("Invalid request: `variables` must be an object")
        operation = _operation(document, body.get("operationName"))
        if any(isinstance(s, FieldNode) and s.name.value in ("__schema", "__type")
               for s in operation.selection_set.selections):
            return self._introspect(document, inputs, body.get("operationName"))
        fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
        ctx = _Context(fragments, self._variables(operation, inputs))
        fields = [
            (key, node, {} if node.name.value == "__typename" else
             self._arguments(self.schema.query_type.fields[node.name.value], node, ctx))
            for key, node in self._collect(operation.selection_set, "Query", ctx).items()
            # graph-node ignores object fields without a selection
            if node.name.value == "__typename" or node.selection_set is not None
        ]
        entity_fields = [args for _, node, args in fields if node.name.value not in ("_meta", "__typename")]
        if indexing_error and any(args["subgraphError"] == "deny" for args in entity_fields):
            return Answer.errors([{"message": "indexing_error"}])
        data = ",".join(f"{json.dumps(key)}:{_encode(self._resolve(node, args, ctx, max_skip, indexing_error))}"
                        for key, node, args in fields)
        errors = ',"errors":[{"message":"indexing_error"}]' if indexing_error and entity_fields else ""
        ctx.answer.body = '{"data":{' + data + "}" + errors + "}"
        return ctx.answer

    def _introspect(self, document: DocumentNode, inputs: dict[str, Any], operation: str | None) -> Answer:
        """Introspection, answered by graphql-core itself."""
        result = execute_sync(self.schema, document, variable_values=inputs, operation_name=operation)
        errors = [_graph_node_error(e).errors[0] for e in result.errors or ()]
        return Answer(_encode({"data": result.data} | ({"errors": errors} if errors else {})), error=bool(errors))

    def _variables(self, operation: OperationDefinitionNode, inputs: dict[str, Any]) -> VariableValues:
        for definition in operation.variable_definitions or ():
            name = definition.variable.name.value
            if isinstance(definition.type, NonNullTypeNode) and definition.default_value is None \
                    and inputs.get(name) is None:
                raise QueryError(f"No value provided for required variable `{name}`")
        result = get_variable_values(self.schema, operation.variable_definitions or (), inputs)
        if isinstance(result, list):
            name = re.search(r"Variable '\$(\w+)'", result[0].message)
            wanted = name[1] if name else ""
            raise QueryError(f"Invalid value provided for argument `{wanted}`: {_debug_json(inputs.get(wanted))}")
        return result

    def _arguments(self, field_def: GraphQLField, node: FieldNode, ctx: _Context) -> dict[str, Any]:
        given = {arg.name.value: arg for arg in node.arguments or ()}
        out: dict[str, Any] = {}
        for name, arg_def in field_def.args.items():
            try:
                coerce_argument(out, node, name, arg_def, given.get(name), ctx.variables, None)
            except GraphQLError as exc:
                if name not in given:
                    raise QueryError(f"No value provided for required argument: `{name}`") from exc
                raise QueryError(f"Invalid value provided for argument `{name}`: "
                                 f"{_debug(given[name].value, ctx.variables)}") from exc
        return out

    def _collect(self, selection_set: SelectionSetNode | None, type_name: str, ctx: _Context,
                 out: dict[str, FieldNode] | None = None) -> dict[str, FieldNode]:
        """Fields of a selection set by response key, with fragments expanded and @skip/@include applied."""
        out = {} if out is None else out
        for selection in selection_set.selections if selection_set else ():
            if not _included(selection, ctx.variables):
                continue
            if isinstance(selection, FieldNode):
                out.setdefault(selection.alias.value if selection.alias else selection.name.value, selection)
                continue
            fragment = ctx.fragments[selection.name.value] if isinstance(selection, FragmentSpreadNode) else selection
            assert isinstance(fragment, FragmentDefinitionNode | InlineFragmentNode)
            if fragment.type_condition is None or fragment.type_condition.name.value == type_name:
                self._collect(fragment.selection_set, type_name, ctx, out)
        return out

    def _block(self, arg: dict[str, Any] | None) -> int | None:
        """The block a field is pinned at (None = the dataset's head), or graph-node's error."""
        head = None if self.head_block >= HEAD_BLOCK else self.head_block
        if not arg:
            return head
        if arg.get("hash") is not None:
            if "0x" + arg["hash"].hex() != block_hash(self._key, self.head_block):
                raise QueryError("Failed to decode `block.hash` value: `no block with that hash found`")
            return head
        for wanted in (arg.get("number"), arg.get("number_gte")):
            if wanted is not None and wanted > self.head_block:
                raise QueryError(
                    f"Failed to decode `block.number` value: `subgraph {self.deployment} has only indexed up to "
                    f"block number {self.head_block} and data for block number {wanted} is therefore not yet "
                    "available`"
                )
        number = arg.get("number")
        return number if number is not None and number < self.head_block else head

    def _meta(self, block: int | None, indexing_error: bool) -> dict[str, Any]:
        number = self.head_block if block is None else block
        return {
            "block": {
                "number": number,
                "hash": block_hash(self._key, number),
                "timestamp": block_timestamp(number),
                "parentHash": block_hash(self._key, number - 1),
            },
            "deployment": self.deployment,
            "hasIndexingErrors": indexing_error,
        }

    def _project(self, node: FieldNode, value: dict[str, Any], type_name: str, ctx: _Context) -> dict[str, Any]:
        """A plain object (``_meta``) restricted to the selection."""
        out = {}
        for key, sub in self._collect(node.selection_set, type_name, ctx).items():
            name = sub.name.value
            if name == "__typename":
                out[key] = type_name
            elif not isinstance(value[name], dict):
                out[key] = value[name]
            elif sub.selection_set is not None:
                out[key] = self._project(sub, value[name], "_Block_", ctx)
        return out

    def _resolve(self, node: FieldNode, args: dict[str, Any], ctx: _Context, max_skip: int | None,
                 indexing_error: bool) -> Any:
        name = node.name.value
        if name == "__typename":
            return "Query"
        block = self._block(args.get("block"))
        if name == "_meta":
            return self._project(node, self._meta(block, indexing_error), "_Meta_", ctx)
        entity, plural = self._roots[name]
        table, pins = self.store.at(entity, block)
        selection = [(key, sub.name.value) for key, sub in self._collect(node.selection_set, entity, ctx).items()]
        if not plural:
            page = collection(table, {"id": args["id"]}, first=1, pins=pins)
            ctx.answer.rows += len(page.rows)
            return Json(table.render_json(page.rows, selection)[0]) if len(page.rows) else None
        first = 100 if args.get("first") is None else args["first"]
        skip = args.get("skip") or 0
        if not 0 <= first <= MAX_FIRST:
            raise QueryError(f"The `first` argument must be between 0 and {MAX_FIRST}, but is {first}")
        if max_skip is not None and not 0 <= skip <= max_skip:
            raise QueryError(f"The `skip` argument must be between 0 and {max_skip}, but is {skip}")
        page = collection(table, args.get("where"), order_by=args.get("orderBy") or "id",
                          desc=args.get("orderDirection") == "desc", first=first, skip=skip, pins=pins)
        ctx.answer.in_rows = max(ctx.answer.in_rows, page.in_rows)
        ctx.answer.rows += len(page.rows)
        if entity == "OrderFilledEvent":
            ctx.answer.fill_query = True
            ctx.answer.fills += len(page.rows)
        return Json("[" + ",".join(table.render_json(page.rows, selection)) + "]")


def _included(node: SelectionNode, variables: VariableValues) -> bool:
    """False when ``@skip(if: true)`` or ``@include(if: false)`` drops the selection."""
    skip = get_directive_values(GraphQLSkipDirective, node, variables)
    include = get_directive_values(GraphQLIncludeDirective, node, variables)
    return not (skip and skip["if"]) and not (include and not include["if"])


def _operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name:
        matching = [op for op in operations if op.name and op.name.value == name]
        if not matching:
            raise QueryError(f"Operation name not found `{name}`")
        operation = matching[0]
    elif len(operations) == 1:
        operation = operations[0]
    else:
        raise QueryError("Operation name required" if operations else "The query is empty")
    if operation.operation != OperationType.QUERY:
        raise QueryError(f"Not supported: {operation.operation.value.capitalize()}s are not supported")
    return operation

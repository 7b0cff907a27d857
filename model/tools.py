"""
Tools a model can call, and the loop that lets it call them (2-eval.py, evaluation scoring, the demo).

    from model.tools import TOOLS, tool_schemas, run_call, calculate
    tool_schemas(["calculator"])        # [{"type": "function", "function": {"name", "description", "parameters"}}]
    calculate("123*456")                # "56088"; ToolError for anything that is not plain arithmetic
    run_call(call, declared_tools)      # ToolResult(content, error): the text the model sees as the tool's result

The registry (TOOLS) maps a name to a Tool: its JSON-schema description (what the model is shown inside <tools>)
and the Python function that runs it on the call's arguments. The format of calls and results is model/chat.py's.

The calculator never evaluates Python: it parses the expression with `ast` and walks the tree itself, allowing
only numbers, + - * / (unary + and - too) and parentheses. Sizes are bounded (characters, tree nodes, digits of
every literal and intermediate result), so `9**9**9` (no `**` anyway), a 10,000-digit number or a product of
huge factors is refused at once instead of hanging the process. Arithmetic is exact (fractions): 0.1+0.2 is 0.3.

run_tool_loop(tokenizer, generate, conversations, tools, ...) -> [ToolRun]: generate a reply to every
conversation; a reply with <tool_call> blocks is parsed (chat.parse_tool_calls), each call checked against the
declared tools and run, the results appended as tool turns, and the model asked again, up to max_rounds replies;
a reply that does not parse is kept as text and counted as a format error, never raised. Conversations go through
it together, one round at a time, so `generate` can batch (evaluation) or stream one reply (2-eval.py).
"""
import ast
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, NamedTuple, Optional

from .chat import CALL_OPEN, check_call, encode_chat, parse_tool_calls, tool_function


class ToolError(ValueError):
    """A call a tool refuses (bad input, too large): the message is what the model is told."""


# ----------------------------------------------------------------------------------------------------------
# the calculator

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 100  # ast nodes: ~50 numbers and operators
MAX_DIGITS = 30  # every literal and every intermediate result stays below 10**30 (and so do denominators)
ALLOWED = "only numbers, + - * / and parentheses are allowed"
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
             ast.Div: lambda a, b: a / b}
# what people type for the same operators: 123×456, 56088÷456, （1+2）
TYPED = str.maketrans({"×": "*", "÷": "/", "（": "(", "）": ")", "−": "-", "＋": "+", "－": "-", "＊": "*", "／": "/"})


def _bounded(value: Fraction) -> Fraction:
    limit = 10 ** MAX_DIGITS
    if abs(value.numerator) >= limit * value.denominator or value.denominator >= limit:
        raise ToolError(f"a number in the calculation has more than {MAX_DIGITS} digits")
    return value


def _evaluate(node) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, str, complex, None, bytes, ...
            raise ToolError(f"{node.value!r} is not a number; {ALLOWED}")
        try:  # a float by its shortest decimal text, so 0.1 is exactly 1/10
            return _bounded(Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value))
        except (ValueError, OverflowError):  # inf, nan
            raise ToolError(f"a number in the calculation has more than {MAX_DIGITS} digits") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ToolError("division by zero")
        return _bounded(OPERATORS[type(node.op)](left, right))
    raise ToolError(f"{type(node).__name__} is not arithmetic: {ALLOWED}")


def format_number(value: Fraction) -> str:
    """An integer as its digits; anything else with up to 10 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


def calculate(expression) -> str:
    """The value of an arithmetic expression as text (see the module docstring); ToolError otherwise."""
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be a string, not {type(expression).__name__}")
    text = expression.translate(TYPED).strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ToolError(f"{text!r} is not an arithmetic expression: {ALLOWED}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"the expression has more than {MAX_NODES} parts")
    return format_number(_evaluate(tree.body))


# ----------------------------------------------------------------------------------------------------------
# the registry

@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict = field(default_factory=dict)  # JSON schema of the arguments object
    run: Callable[[dict], str] = None  # arguments -> result text; raises ToolError

    def schema(self) -> dict:
        """The description a request or a training record declares: OpenAI's {"type": "function", ...}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


CALCULATOR = Tool(
    name="calculator",
    description="计算算术表达式（数字和 + - * / 括号）",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    run=lambda arguments: calculate(arguments["expression"]),
)
TOOLS = {tool.name: tool for tool in (CALCULATOR,)}


def tool_schemas(names=None, registry=None) -> list:
    """The schemas of the named tools (all of the registry's by default)."""
    registry = TOOLS if registry is None else registry
    unknown = [name for name in names or () if name not in registry]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)} (known: {', '.join(registry)})")
    return [registry[name].schema() for name in (names if names is not None else registry)]


class ToolResult(NamedTuple):
    content: str          # what goes into the tool turn
    error: Optional[str]  # why the call was not run, or why the tool refused it; None when it ran


def run_call(call, declared, registry=None) -> ToolResult:
    """Run one parsed call: it must fit the declared tools (chat.check_call) and be in the registry. A refused
    call is answered too ("error: ..."), so the model sees why and a conversation never stops on it."""
    registry = TOOLS if registry is None else registry
    reason = check_call(call, declared)
    name = tool_function(call).get("name")
    if reason is None and name not in registry:
        reason = f"no tool named {name!r} runs here"
    if reason is None:
        try:
            return ToolResult(str(registry[name].run(tool_function(call)["arguments"])), None)
        except ToolError as err:
            reason = str(err)
    return ToolResult(f"error: {reason}", reason)


# ----------------------------------------------------------------------------------------------------------
# the loop: reply, run the calls, feed the results back, reply again

@dataclass
class ToolRun:
    """One conversation through the loop."""
    messages: list                       # the conversation with the assistant's calls and the tool turns added
    answer: str = ""                     # the final reply's text (the whole reply when its calls did not parse)
    calls: list = field(default_factory=list)          # every parsed call, in order
    results: list = field(default_factory=list)        # a ToolResult per call
    invalid: list = field(default_factory=list)        # why a parsed call did not fit the declared tools
    format_errors: list = field(default_factory=list)  # why a reply with <tool_call> did not parse
    attempts: int = 0                    # replies that contained <tool_call>
    well_formed: int = 0                 # of those, replies whose calls parsed and all fit the declared tools
    finished: bool = False               # False: the last allowed reply still called a tool


def run_tool_loop(tokenizer, generate, conversations, tools, registry=None, max_rounds=3, on_event=None):
    """See the module docstring. conversations: message lists, each ending with the user's turn. tools: the
    declared tool list of each conversation (or one list for all). generate(prompt id lists) -> the reply texts
    (each up to its </s>). on_event(index, kind, value): "call" (the call), "result" (ToolResult), "format_error"
    (the reason), "answer" (the final text), as they happen (2-eval.py --interactive prints them)."""
    if tools and isinstance(tools[0], dict):  # one list for every conversation
        tools = [tools] * len(conversations)
    tools = tools or [None] * len(conversations)
    emit = on_event or (lambda index, kind, value: None)
    runs = [ToolRun(list(messages)) for messages in conversations]
    active = list(range(len(runs)))
    for _ in range(max_rounds):
        if not active:
            break
        texts = generate([encode_chat(tokenizer, runs[i].messages, tools[i]) for i in active])
        waiting = []
        for i, text in zip(active, texts):
            run, parsed = runs[i], parse_tool_calls(text)
            run.attempts += CALL_OPEN in text
            if parsed.error is not None or not parsed.calls:
                if parsed.error is not None:
                    run.format_errors.append(parsed.error)
                    emit(i, "format_error", parsed.error)
                run.messages.append({"role": "assistant", "content": parsed.content})
                run.answer, run.finished = parsed.content, True
                emit(i, "answer", parsed.content)
                continue
            run.messages.append({"role": "assistant", "content": parsed.content, "tool_calls": parsed.calls})
            reasons = [check_call(call, tools[i]) for call in parsed.calls]
            run.invalid += [reason for reason in reasons if reason is not None]
            run.well_formed += all(reason is None for reason in reasons)
            for call in parsed.calls:
                emit(i, "call", call)
                result = run_call(call, tools[i], registry)
                run.calls.append(call)
                run.results.append(result)
                run.messages.append({"role": "tool", "content": result.content})
                emit(i, "result", result)
            run.answer = parsed.content
            waiting.append(i)
        active = waiting
    return runs

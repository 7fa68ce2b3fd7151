#!/usr/bin/env python3
"""Chat-format fixtures for tests/test_chat.c, produced with mistral-common.

For every case this script builds a molt dataset record (the JSON a user would put in a
chat JSONL file), converts it to a mistral-common ChatCompletionRequest, encodes it with
mistral-common's own instruct encoder (InstructTokenizerV13 / V15) over molt's tekken.json,
and writes one JSON line per case to tests/fixtures/chat/golden.jsonl:

    {"case", "version", "source", "mistral_common", "record", "ids", "text"}

source "golden": the request mirrors a case of mistral-common's integration tests and the
ids were checked against that case's tests/data/expected/<case>/expected.json (embedded
below); "mistral-common": extra cases whose ids come from mistral-common alone.

molt's tekken.json names only the control tokens the chat format uses; mistral-common's
encoder also looks up [IMG], [PREFIX], [CALL_ID], ... at construction time, so the script
encodes with a temporary copy in which those unused slots carry their names and the config
carries a model_settings_builder (reasoning_effort none|high, default none, as the pinned
v15 test tokenizer). The script asserts that none of those patched ids is ever emitted.
See tools/reference/README_chat.md.
"""
import argparse
import copy
import importlib.metadata
import json
import os
import sys
import tempfile

from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest, ReasoningEffort
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Slots that mistral-common requires by name but the text-only chat format never emits.
PATCHED_NAMES = {10: "[IMG]", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]",
                 15: "[MIDDLE]", 16: "[SUFFIX]", 19: "[TOOL_CONTENT]", 33: "[CALL_ID]"}

MS_NONE = [36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 17670, 46005, 37]
MS_HIGH = [36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 24871, 46005, 37]
MATH_TOOL_IDS = [5, 1091, 19227, 4994, 2811, 1429, 5165, 1897, 1429, 5165, 2811, 16753, 2391,
                 2811, 1429, 2978, 55359, 88521, 1897, 1429, 14653, 2811, 1429, 4147, 1278,
                 2632, 1307, 1420, 54114, 4818, 39249, 1429, 26204, 2811, 16753, 4994, 2811,
                 1429, 6371, 1897, 1429, 48649, 2811, 16753, 90043, 2811, 16753, 4994, 2811,
                 1429, 3607, 1897, 1429, 14653, 2811, 1429, 25697, 4818, 2613, 108978, 27028, 6]
# "[INST]U1[/INST]A1[TOOL_CALLS]F1[ARGS]{}[TOOL_CALLS]F2[ARGS]{}</s>[TOOL_RESULTS]R1
#  [/TOOL_RESULTS][TOOL_RESULTS]R2[/TOOL_RESULTS]A2</s>[INST]U2[/INST]"
TWO_CALL_TAIL = [3, 1085, 1049, 4, 1065, 1049, 9, 1070, 1049, 32, 30620, 9, 1070, 1050, 32,
                 30620, 2, 7, 1082, 1049, 8, 7, 1082, 1050, 8, 1065, 1050, 2, 3, 1085, 1050, 4]
SYS_S = [17, 1083, 18]
CALL_ID_V13 = [1, 3, 1097, 4, 9, 1102, 32, 30620, 2, 7, 1098, 8]
WEATHER_TOOLS_IDS = [
    5, 1091, 19227, 4994, 2811, 1429, 5165, 1897, 1429, 5165, 2811, 16753, 2391, 2811, 1429,
    1689, 45971, 1095, 45629, 1897, 1429, 14653, 2811, 1429, 4147, 1278, 3519, 17253, 1897,
    1429, 26204, 2811, 16753, 4994, 2811, 1429, 6371, 1897, 1429, 48649, 2811, 16753, 17611,
    2811, 16753, 4994, 2811, 1429, 3607, 1897, 1429, 14653, 2811, 1429, 1784, 5970, 1321,
    3468, 1044, 1324, 3596, 1046, 5151, 12717, 1044, 13461, 50666, 1429, 8092, 2811, 16753,
    4994, 2811, 1429, 3607, 1897, 1429, 31222, 2811, 12161, 1099, 79092, 1897, 1429, 38600,
    10432, 31597, 1429, 14653, 2811, 1429, 1784, 6138, 5476, 1317, 2210, 1046, 90463, 1593,
    1562, 1278, 8616, 7285, 2613, 47579, 1429, 15760, 2811, 12161, 17611, 1897, 1429, 8092,
    4964, 2821, 4179, 16753, 4994, 2811, 1429, 5165, 1897, 1429, 5165, 2811, 16753, 2391,
    2811, 1429, 1689, 4883, 57811, 1095, 45629, 1095, 120596, 1897, 1429, 14653, 2811, 1429,
    4147, 1420, 1464, 17008, 17253, 52932, 1897, 1429, 26204, 2811, 16753, 4994, 2811, 1429,
    6371, 1897, 1429, 48649, 2811, 16753, 17611, 2811, 16753, 4994, 2811, 1429, 3607, 1897,
    1429, 14653, 2811, 1429, 1784, 5970, 1321, 3468, 1044, 1324, 3596, 1046, 5151, 12717,
    1044, 13461, 50666, 1429, 8092, 2811, 16753, 4994, 2811, 1429, 3607, 1897, 1429, 31222,
    2811, 12161, 1099, 79092, 1897, 1429, 38600, 10432, 31597, 1429, 14653, 2811, 1429, 1784,
    6138, 5476, 1317, 2210, 1046, 90463, 1593, 1562, 1278, 8616, 7285, 2613, 4179, 1429,
    10309, 99794, 2811, 16753, 4994, 2811, 1429, 49039, 1897, 1429, 14653, 2811, 1429, 1784,
    2782, 1307, 5072, 1317, 52932, 1034, 47579, 1429, 15760, 2811, 12161, 17611, 1897, 1429,
    8092, 1897, 1429, 10309, 99794, 4964, 2821, 27028, 6]
WEATHER_SYSTEM_IDS = [
    17, 11874, 2405, 3180, 31215, 2314, 2549, 4213, 1317, 27148, 2203, 7389, 1046, 18, 17,
    83665, 1394, 80697, 1693, 1261, 3330, 4546, 1395, 61103, 1046, 18]
WEATHER_CHAT_IDS = [
    3, 7493, 1681, 1278, 17253, 2479, 9406, 4, 69957, 1044, 1710, 1636, 10678, 5234, 1639,
    1454, 2143, 7285, 1063, 2, 3, 1073, 4525, 1294, 6993, 1044, 5498, 1046, 4, 9, 1689, 45971,
    1095, 45629, 32, 19227, 17611, 2811, 1429, 42572, 1044, 5498, 1897, 1429, 8092, 2811,
    1429, 1099, 79092, 46005, 2, 7, 1050, 1050, 8, 1784, 3519, 6138, 1294, 6993, 1044, 5498,
    1395, 1032, 1050, 1050, 17633, 112399, 1046, 2, 3, 13394, 1395, 1278, 17253, 4670, 1317,
    1402, 2479, 1294, 6993, 1044, 5498, 2136, 1278, 4275, 2460, 5072, 4, 17013, 5584, 1639,
    1278, 2782, 1307, 5072, 1636, 2933, 1278, 17253, 52932, 1394, 1046, 2, 3, 1053, 5072, 4,
    9, 1689, 4883, 57811, 1095, 45629, 1095, 120596, 32, 19227, 17611, 2811, 1429, 42572,
    1044, 5498, 1897, 1429, 8092, 2811, 1429, 1099, 79092, 1897, 1429, 10309, 99794, 2811,
    1032, 1053, 1125, 2, 7, 19227, 1050, 1048, 1050, 1052, 1045, 1048, 1053, 1045, 1050,
    1050, 12592, 1050, 1050, 8011, 1050, 1048, 1050, 1052, 1045, 1048, 1053, 1045, 1050,
    1051, 12592, 1050, 1051, 8011, 1050, 1048, 1050, 1052, 1045, 1048, 1053, 1045, 1050,
    1052, 12592, 1050, 1052, 8011, 1050, 1048, 1050, 1052, 1045, 1048, 1053, 1045, 1050,
    1053, 12592, 1050, 1053, 8011, 1050, 1048, 1050, 1052, 1045, 1048, 1053, 1045, 1050,
    1054, 12592, 1050, 1054, 46005, 8]

# Token ids of mistral-common's tests/data/expected/<case>/expected.json (text-only v13 cases
# use the pinned v13-text tokenizer, v15 cases the pinned v15-image-settings tokenizer),
# written as the concatenation of the shared pieces above.
GOLDEN = {
    "chat-v13-think-order": [1, 17, 1083, 1049, 34, 9983, 35, 1083, 1050, 18] + MATH_TOOL_IDS
    + TWO_CALL_TAIL[:25] + [34, 1084, 1049, 35] + TWO_CALL_TAIL[25:],
    "chat-v13-reversed-results": [1] + SYS_S + MATH_TOOL_IDS + TWO_CALL_TAIL,
    "chat-v13-call-id-x": CALL_ID_V13,
    "chat-v13-call-id-slash": CALL_ID_V13,
    "chat-v13-prefixed-final": [1, 3, 1097, 4, 1098],
    "chat-v13-released-system-think": [1, 17, 34, 37133, 35, 18, 3, 22177, 4],
    "chat-sample-weather-full-released-p13t": [1] + WEATHER_SYSTEM_IDS + WEATHER_TOOLS_IDS
    + WEATHER_CHAT_IDS,
    "chat-sample-weather-full-released-p15i": [1] + WEATHER_SYSTEM_IDS + WEATHER_TOOLS_IDS
    + MS_NONE + WEATHER_CHAT_IDS,
    "chat-v15-call-id-x": [1] + MS_NONE + CALL_ID_V13[1:],
    "chat-v15-call-id-slash": [1] + MS_NONE + CALL_ID_V13[1:],
    "chat-v15-prefixed-final": [1] + MS_NONE + [3, 1097, 4, 1098],
    "chat-v15-default-absent": [1] + SYS_S + MS_NONE + TWO_CALL_TAIL,
    "chat-v15-default-none": [1] + SYS_S + MS_NONE + TWO_CALL_TAIL,
    "chat-v15-default-high": [1] + SYS_S + MS_HIGH + TWO_CALL_TAIL,
    "chat-v15-policy-absent-both": [1] + SYS_S + MATH_TOOL_IDS + MS_NONE + TWO_CALL_TAIL,
    "chat-v15-policy-none-both": [1] + SYS_S + MATH_TOOL_IDS + MS_NONE + TWO_CALL_TAIL,
    "chat-v15-policy-high-both": [1] + SYS_S + MATH_TOOL_IDS + MS_HIGH + TWO_CALL_TAIL,
}

MATH_TOOL = {"type": "function", "function": {
    "name": "math_interpreter",
    "description": "Get the value of an arithmetic expression.",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "description": "Math expression."}}}}}


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def two_calls(results=(("R1", "123456789"), ("R2", "999999999")), a2="A2"):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1",
             "tool_calls": [call("123456789", "F1", "{}"), call("999999999", "F2", "{}")]}]
    msgs += [{"role": "tool", "content": c, "tool_call_id": i} for c, i in results]
    msgs += [{"role": "assistant", "content": a2}, {"role": "user", "content": "U2"}]
    return msgs


def call_id(cid):
    return {"messages": [{"role": "user", "content": "a"},
                         {"role": "assistant", "tool_calls": [call(cid, "f", "{}")]},
                         {"role": "tool", "content": "b", "tool_call_id": cid}]}


def weather_record():
    loc = {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}
    fmt = {"type": "string", "enum": ["celsius", "fahrenheit"],
           "description": "The temperature unit to use. Infer this from the users location."}
    tools = [
        {"type": "function", "function": {
            "name": "get_current_weather", "description": "Get the current weather",
            "parameters": {"type": "object", "properties": {"location": loc, "format": fmt},
                           "required": ["location", "format"]}}},
        {"type": "function", "function": {
            "name": "get_n_day_weather_forecast", "description": "Get an N-day weather forecast",
            "parameters": {"type": "object", "properties": {
                "location": loc, "format": fmt,
                "num_days": {"type": "integer", "description": "The number of days to forecast"}},
                "required": ["location", "format", "num_days"]}}}]
    msgs = [
        {"role": "system", "content": "Don't make assumptions about what values to plug into functions."},
        {"role": "system", "content": "Ask for clarification if a user request is ambiguous."},
        {"role": "user", "content": "What's the weather like today"},
        {"role": "assistant", "content": "Sure, can you please provide me with your location?"},
        {"role": "user", "content": "I'm in Paris, France."},
        {"role": "assistant", "content": None, "tool_calls": [call(
            "123456789", "get_current_weather", '{"location":"Paris, France","format":"celsius"}')]},
        {"role": "tool", "name": "get_current_weather", "content": "22", "tool_call_id": "123456789"},
        {"role": "assistant", "content": "The current temperature in Paris, France is 22 degrees Celsius."},
        {"role": "user", "content": "what is the weather going to be like in Paris, France over the next x days"},
        {"role": "assistant", "content": "Please tell me the number of days you want the weather forecast for."},
        {"role": "user", "content": "5 days"},
        {"role": "assistant", "content": None, "tool_calls": [call(
            "123456789", "get_n_day_weather_forecast",
            '{"location":"Paris, France","format":"celsius","num_days":5}')]},
        {"role": "tool", "name": "get_n_day_weather_forecast", "tool_call_id": "123456789",
         "content": '{"2024-05-22":"22","2024-05-23":"23","2024-05-24":"24","2024-05-25":"25","2024-05-26":"26"}'},
    ]
    return {"messages": msgs, "tools": tools}


def with_effort(rec, effort):
    rec = dict(rec)
    if effort is not None:
        rec["reasoning_effort"] = effort
    return rec


def cases():
    """(case id, version, record); ids of GOLDEN cases are checked against mistral-common's."""
    think_order = {"tools": [MATH_TOOL], "messages": two_calls()}
    think_order["messages"][0]["content"] = [
        {"type": "text", "text": "S1"}, {"type": "thinking", "thinking": "TS"},
        {"type": "text", "text": "S2"}]
    think_order["messages"][5]["content"] = [
        {"type": "thinking", "thinking": "T1"}, {"type": "text", "text": "A2"}]
    prefixed = {"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b", "prefix": True}]}
    out = [
        ("chat-v13-think-order", 13, think_order),
        ("chat-v13-reversed-results", 13, {"tools": [MATH_TOOL], "messages": two_calls(
            results=(("R2", "999999999"), ("R1", "123456789")))}),
        ("chat-v13-call-id-x", 13, call_id("x")),
        ("chat-v13-call-id-slash", 13, call_id("call/id-1")),
        ("chat-v13-prefixed-final", 13, prefixed),
        ("chat-v13-released-system-think", 13, {"messages": [
            {"role": "system", "content": [{"type": "thinking", "thinking": "Hi"}]},
            {"role": "user", "content": "Hello"}]}),
        ("chat-sample-weather-full-released-p13t", 13, weather_record()),
        ("chat-sample-weather-full-released-p15i", 15, weather_record()),
        ("chat-v15-call-id-x", 15, call_id("x")),
        ("chat-v15-call-id-slash", 15, call_id("call/id-1")),
        ("chat-v15-prefixed-final", 15, prefixed),
        ("chat-v15-default-absent", 15, {"messages": two_calls()}),
        ("chat-v15-default-none", 15, with_effort({"messages": two_calls()}, "none")),
        ("chat-v15-default-high", 15, with_effort({"messages": two_calls()}, "high")),
        ("chat-v15-policy-absent-both", 15, {"messages": two_calls(), "tools": [MATH_TOOL]}),
        ("chat-v15-policy-none-both", 15,
         with_effort({"messages": two_calls(), "tools": [MATH_TOOL]}, "none")),
        ("chat-v15-policy-high-both", 15,
         with_effort({"messages": two_calls(), "tools": [MATH_TOOL]}, "high")),
    ]
    # Extra cases: ids from mistral-common only.
    out += [
        ("molt-v15-thinking-turns", 15, {"reasoning_effort": "high", "messages": [
            {"role": "user", "content": "Is 91 prime?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "91 = 7 * 13."},
                {"type": "text", "text": "No: 91 = 7 x 13."}]},
            {"role": "user", "content": "And 97?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Check 2, 3, 5, 7: none divides 97.\n"},
                {"type": "text", "text": "Yes, 97 is prime."}]}]}),
        ("molt-v15-unicode-and-spaces", 15, {"messages": [
            {"role": "system", "content": "Réponds en français. 日本語も可。"},
            {"role": "user", "content": "  Combien font 2 + 2 ?\n\n"},
            {"role": "assistant", "content": "Ça fait 4 🙂   "},
            {"role": "user", "content": "Merci !"},
            {"role": "assistant", "content": "De rien.\n"}]}),
        ("molt-v15-merged-turns", 15, {"messages": [
            {"role": "user", "content": "First part."},
            {"role": "user", "content": "Second part."},
            {"role": "assistant", "content": "One."},
            {"role": "assistant", "content": "Two."}]}),
        ("molt-v15-tool-args-forms", 15, {"tools": [
            {"type": "function", "function": {"name": "lookup", "parameters": {
                "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "number"}}}}},
            {"type": "function", "function": {"name": "now", "description": "Current time, UTC.",
                                              "parameters": {}}}],
            "messages": [
                {"role": "user", "content": "Find \"tabs\"\tand ünïcode, then the time."},
                {"role": "assistant", "content": "",
                 "tool_calls": [call("a1", "lookup", {"q": "tabs\t\"x\"", "n": 2.5}),
                                call("a2", "now", "not json"),
                                call("a3", "lookup", '{"n":1e-7,"q":"日本"}')]},
                {"role": "tool", "tool_call_id": "a3", "content": "[]"},
                {"role": "tool", "tool_call_id": "a1", "content": "{\"hits\": 3}"},
                {"role": "tool", "tool_call_id": "a2", "content": "12:00"},
                {"role": "assistant", "content": "Three hits; it is noon."}]}),
        ("molt-v13-multi-system", 13, {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Hi again"},
            {"role": "system", "content": "Now be verbose."},
            {"role": "user", "content": "Why?"}]}),
    ]
    return out


def to_chunks(content):
    if content is None or isinstance(content, str):
        return content
    chunks = []
    for c in content:
        if c["type"] == "text":
            chunks.append(TextChunk(text=c["text"]))
        else:
            chunks.append(ThinkChunk(thinking=c["thinking"]))
    return chunks


def to_request(rec):
    msgs = []
    for m in rec["messages"]:
        role = m["role"]
        if role == "system":
            msgs.append(SystemMessage(content=to_chunks(m["content"])))
        elif role == "user":
            msgs.append(UserMessage(content=to_chunks(m["content"])))
        elif role == "tool":
            msgs.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"],
                                    name=m.get("name")))
        else:
            calls = None
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    args = c["function"]["arguments"]
                    if not isinstance(args, str):
                        args = json.dumps(args, ensure_ascii=False)
                    calls.append(ToolCall(id=c["id"], function=FunctionCall(
                        name=c["function"]["name"], arguments=args)))
            msgs.append(AssistantMessage(content=to_chunks(m.get("content")), tool_calls=calls,
                                         prefix=m.get("prefix", False)))
    tools = None
    if "tools" in rec:
        tools = [Tool(function=Function.from_openai(t["function"])) for t in rec["tools"]]
    effort = rec.get("reasoning_effort")
    return ChatCompletionRequest(messages=msgs, tools=tools,
                                 reasoning_effort=ReasoningEffort(effort) if effort else None)


def patched_tokenizer(src, version, tmpdir):
    with open(src, encoding="utf-8") as f:
        tk = json.load(f)
    tk = copy.deepcopy(tk)
    for rank, name in PATCHED_NAMES.items():
        assert tk["special_tokens"][rank]["token_str"].startswith("<SPECIAL_"), rank
        tk["special_tokens"][rank]["token_str"] = name
    tk["config"]["version"] = "v%d" % version
    if version >= 15:
        tk["model_settings_builder"] = {"reasoning_effort": {
            "type": "enum", "accepts_none": True, "default": "none", "values": ["none", "high"]}}
    path = os.path.join(tmpdir, "tekken-v%d.json" % version)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tk, f)
    # "agnostic": content checks only, no rule on the last role (training records end with
    # the assistant; the golden cases end with a user or tool turn).
    return MistralTokenizer.from_file(path, mode=ValidationMode.agnostic)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tekken", default=os.path.join(ROOT, "configs/tokenizers/tekken.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/chat/golden.jsonl"))
    args = ap.parse_args()
    if not os.path.exists(args.tekken):
        sys.exit("no tokenizer at %s (pass --tekken)" % args.tekken)
    mc_version = importlib.metadata.version("mistral_common")
    with tempfile.TemporaryDirectory() as tmp:
        toks = {v: patched_tokenizer(args.tekken, v, tmp) for v in (13, 15)}
        lines, n_golden = [], 0
        for cid, version, rec in cases():
            enc = toks[version].encode_chat_completion(to_request(rec))
            ids = list(enc.tokens)
            bad = sorted(set(ids) & set(PATCHED_NAMES))
            if bad:
                sys.exit("%s: emits patched control ids %s" % (cid, bad))
            if cid in GOLDEN:
                if ids != GOLDEN[cid]:
                    sys.exit("%s: mistral-common over %s differs from the golden ids\n got  %s\n want %s"
                             % (cid, args.tekken, ids, GOLDEN[cid]))
                n_golden += 1
            text = toks[version].instruct_tokenizer.decode(ids, special_token_policy="keep")
            lines.append(json.dumps({"case": cid, "version": version,
                                     "source": "golden" if cid in GOLDEN else "mistral-common",
                                     "mistral_common": mc_version,
                                     "record": rec, "ids": ids, "text": text},
                                    ensure_ascii=False))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %d cases (%d checked against mistral-common's golden ids) to %s; "
          "mistral-common %s" % (len(lines), n_golden, args.out, mc_version))


if __name__ == "__main__":
    main()

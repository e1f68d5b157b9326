-- calcproto.lua: a Wireshark dissector for the calculator protocol of the
-- "application layer lab" (calculator server, caching proxy, client), as
-- spoken by twisted-cacheproxy and by the course's own programs.
--
-- Load it with   wireshark -X lua_script:calcproto.lua
--            or  tshark -X lua_script:calcproto.lua -r capture.pcap
-- or copy it into your personal Lua plugins folder (Help > About Wireshark >
-- Folders > Personal Lua Plugins).
--
-- It decodes TCP ports 9998 (proxy) and 9999 (server), the ports of the
-- preference "calc.ports", and any port chosen with Decode As (CALC).
--
-- Every message is a 12-byte header (time stamp u32, total length u16,
-- flags u16, cache control u16, extension word u16; big-endian) and data.
-- Data of a request is an infix expression in UTF-8, or a Python pickle of
-- the course's expression objects when it starts with 0x80; data of an
-- answer is JSON, or a pickle of (result, steps) or of an exception.
--
-- Written for Lua 5.2 (Wireshark 3.x, 4.0, 4.2) and later: no bitwise
-- operators, no integer division.

local calc = Proto("calc", "Calculator Protocol")

local HEADER_SIZE = 12
local DEFAULT_MAX_MESSAGE = 8192
local FOREVER = 65535
local DEFAULT_PORTS = "9998-9999"

-- ---------------------------------------------------------------------------
-- Fields
-- ---------------------------------------------------------------------------

local STATUS_NAMES = {
    [0] = "none (request)",
    [200] = "OK",
    [400] = "Client error",
    [500] = "Server error",
}

local f = {
    timestamp = ProtoField.absolute_time("calc.timestamp", "Time stamp", base.UTC,
        "When the sender built the message (for a cached answer: when the server built it)"),
    total_length = ProtoField.uint16("calc.total_length", "Total length", base.DEC, nil, nil,
        "Header and data, in bytes"),
    flags = ProtoField.uint16("calc.flags", "Flags", base.HEX),
    reserved = ProtoField.uint16("calc.flags.reserved", "Reserved", base.DEC, nil, 0xE000,
        "Bits 15-13: always 0"),
    cache = ProtoField.bool("calc.flags.cache", "Cache (C)", 16,
        { "caching allowed", "no caching" }, 0x1000),
    steps_flag = ProtoField.bool("calc.flags.steps", "Steps (S)", 16,
        { "steps asked for / included", "no steps" }, 0x0800),
    request = ProtoField.bool("calc.flags.request", "Type (T)", 16,
        { "request", "response" }, 0x0400),
    status = ProtoField.uint16("calc.status", "Status", base.DEC, STATUS_NAMES, 0x03FF),
    cache_control = ProtoField.uint16("calc.cache_control", "Cache control", base.DEC, nil, nil,
        "Requests: oldest cached answer accepted (65535 any age, 0 reload); "
            .. "answers: seconds it may be cached (65535 forever)"),
    ext = ProtoField.uint16("calc.ext", "Extension word", base.HEX, nil, nil,
        "Bytes 10-11: padding to the course programs; hop capabilities, cache marks, tag"),
    ext_framed = ProtoField.bool("calc.ext.framed", "Length-framed (L)", 16,
        { "frames by length, answers in order, echoes tags", "not set" }, 0x0001),
    ext_from_cache = ProtoField.bool("calc.ext.from_cache", "From cache (H)", 16,
        { "served from a cache's store", "not set" }, 0x0002),
    ext_grace = ProtoField.bool("calc.ext.grace", "Grace (G)", 16,
        { "served past its lifetime (stale-if-error)", "not set" }, 0x0004),
    ext_tag = ProtoField.uint16("calc.ext.tag", "Tag", base.DEC, nil, 0xFFF8,
        "Request tag (0: none), echoed by an answering side that sets L"),
    data = ProtoField.bytes("calc.data", "Data"),
    encoding = ProtoField.string("calc.encoding", "Encoding"),
    expression = ProtoField.string("calc.expression", "Expression", base.UNICODE),
    result = ProtoField.string("calc.result", "Result", base.UNICODE),
    steps = ProtoField.string("calc.steps", "Step", base.UNICODE),
    step_count = ProtoField.uint16("calc.step_count", "Steps", base.DEC),
    error = ProtoField.string("calc.error", "Error", base.UNICODE),
    error_type = ProtoField.string("calc.error.type", "Error type", base.UNICODE),
    pickle = ProtoField.string("calc.pickle", "Pickle"),
    pickle_protocol = ProtoField.uint8("calc.pickle.protocol", "Pickle protocol", base.DEC),
    pickle_global = ProtoField.string("calc.pickle.global", "Global", base.ASCII,
        "A class or function the pickle names"),
    response_in = ProtoField.framenum("calc.response_in", "Response in", base.NONE,
        frametype.RESPONSE),
    request_in = ProtoField.framenum("calc.request_in", "Request in", base.NONE,
        frametype.REQUEST),
    time = ProtoField.relative_time("calc.time", "Response time", "Time since the request"),
}
calc.fields = f

local e = {
    short_length = ProtoExpert.new("calc.expert.short_length",
        "Total length below 12: the stream cannot be resynchronised",
        expert.group.MALFORMED, expert.severity.ERROR),
    truncated = ProtoExpert.new("calc.expert.truncated", "Total length beyond the data",
        expert.group.MALFORMED, expert.severity.ERROR),
    oversize = ProtoExpert.new("calc.expert.oversize",
        "Total length above the default largest message (8192)",
        expert.group.PROTOCOL, expert.severity.NOTE),
    after_broken = ProtoExpert.new("calc.expert.after_broken",
        "Bytes after an impossible total length (not parsed)",
        expert.group.MALFORMED, expert.severity.WARN),
    reserved = ProtoExpert.new("calc.expert.reserved", "Reserved flag bits set",
        expert.group.PROTOCOL, expert.severity.WARN),
    status = ProtoExpert.new("calc.expert.status", "Unexpected status code",
        expert.group.PROTOCOL, expert.severity.WARN),
    error_answer = ProtoExpert.new("calc.expert.error_answer", "Error answer",
        expert.group.RESPONSE_CODE, expert.severity.NOTE),
    wrong_direction = ProtoExpert.new("calc.expert.wrong_direction",
        "Message type does not fit its direction",
        expert.group.PROTOCOL, expert.severity.WARN),
    ext_request = ProtoExpert.new("calc.expert.ext_request",
        "Answer-only extension bits (L, H, G) set in a request",
        expert.group.PROTOCOL, expert.severity.WARN),
    grace = ProtoExpert.new("calc.expert.grace", "G set without H or with C=1",
        expert.group.PROTOCOL, expert.severity.WARN),
    tag_mismatch = ProtoExpert.new("calc.expert.tag_mismatch",
        "The answer's tag differs from its request's",
        expert.group.SEQUENCE, expert.severity.WARN),
    unmatched = ProtoExpert.new("calc.expert.unmatched", "Answer without a request",
        expert.group.SEQUENCE, expert.severity.WARN),
    bad_data = ProtoExpert.new("calc.expert.bad_data", "Data cannot be decoded",
        expert.group.MALFORMED, expert.severity.WARN),
}
calc.experts = e

calc.prefs.ports = Pref.range("TCP ports", DEFAULT_PORTS,
    "TCP ports decoded as the calculator protocol (9998 proxy, 9999 server, and others)", 65535)

-- ---------------------------------------------------------------------------
-- Small helpers (arithmetic instead of bit operators, for every Lua version)
-- ---------------------------------------------------------------------------

local floor = math.floor

local function bits(value, mask_shift, width)
    return floor(value / 2 ^ mask_shift) % 2 ^ width
end

local function int_text(n)
    return string.format("%.0f", n)
end

-- Python's repr() of a float: the shortest text that reads back as the same
-- double, in fixed notation for exponents -4..15, else "1e-05" style.
local function float_repr(x)
    if x ~= x then
        return "nan"
    elseif x == math.huge then
        return "inf"
    elseif x == -math.huge then
        return "-inf"
    elseif x == 0 then
        return (1 / x < 0) and "-0.0" or "0.0"
    end
    local text
    for precision = 1, 17 do
        text = string.format("%." .. (precision - 1) .. "e", x)
        if tonumber(text) == x then
            break
        end
    end
    local sign, first, rest, exponent = text:match("^(-?)(%d)%.?(%d*)e([-+]%d+)$")
    local digits = (first .. rest):gsub("0+$", "")
    if digits == "" then
        digits = "0"
    end
    exponent = tonumber(exponent)
    if exponent < -4 or exponent >= 16 then
        local mantissa = digits:sub(1, 1)
        if #digits > 1 then
            mantissa = mantissa .. "." .. digits:sub(2)
        end
        return string.format("%s%se%s%02d", sign, mantissa, exponent < 0 and "-" or "+",
            math.abs(exponent))
    end
    local point = exponent + 1 -- digits before the decimal point
    if point <= 0 then
        return sign .. "0." .. string.rep("0", -point) .. digits
    elseif point >= #digits then
        return sign .. digits .. string.rep("0", point - #digits) .. ".0"
    end
    return sign .. digits:sub(1, point) .. "." .. digits:sub(point + 1)
end

-- A little-endian two's-complement integer of any size, as decimal text.
local function long_text(s, i, n)
    if n == 0 then
        return "0"
    end
    local limbs = {}
    for k = 1, n do
        limbs[k] = s:byte(i + k - 1)
    end
    local negative = limbs[n] >= 128
    if negative then -- two's complement: invert and add one
        local carry = 1
        for k = 1, n do
            local v = 255 - limbs[k] + carry
            limbs[k] = v % 256
            carry = floor(v / 256)
        end
    end
    -- repeated division by 10, most significant byte first
    local out = {}
    local nonzero = true
    while nonzero do
        nonzero = false
        local remainder = 0
        for k = n, 1, -1 do
            local v = remainder * 256 + limbs[k]
            limbs[k] = floor(v / 10)
            remainder = v % 10
            if limbs[k] ~= 0 then
                nonzero = true
            end
        end
        out[#out + 1] = tostring(remainder)
    end
    local text = string.reverse(table.concat(out)):gsub("^0+(%d)", "%1")
    return (negative and "-" or "") .. text
end

local function le_uint(s, i, n)
    local v = 0
    for k = n, 1, -1 do
        v = v * 256 + s:byte(i + k - 1)
    end
    return v
end

local function be_double(s, i)
    local b = { s:byte(i, i + 7) }
    local sign = b[1] >= 128 and -1 or 1
    local exponent = (b[1] % 128) * 16 + floor(b[2] / 16)
    local mantissa = b[2] % 16
    for k = 3, 8 do
        mantissa = mantissa * 256 + b[k]
    end
    if exponent == 2047 then
        return mantissa == 0 and sign * math.huge or 0 / 0
    elseif exponent == 0 then
        return sign * mantissa * 2 ^ -1074
    end
    return sign * (1 + mantissa / 2 ^ 52) * 2 ^ (exponent - 1023)
end

-- ---------------------------------------------------------------------------
-- A pickle reader: runs the opcodes of the course pickles on plain Lua
-- tables (nothing is ever called), then the results are rendered.
-- ---------------------------------------------------------------------------

local MAX_OPCODES = 100000
local MARK = {}

local function new_global(module, name)
    return { kind = "global", module = module, name = name }
end

local function read_pickle(s)
    local pos, len = 1, #s
    local stack, marks, memo = {}, {}, {}
    local globals, seen = {}, {}
    local protocol = nil

    local function need(n)
        if pos + n - 1 > len then
            error("pickle data was truncated", 0)
        end
    end
    local function arg(n)
        need(n)
        local v = le_uint(s, pos, n)
        pos = pos + n
        return v
    end
    local function text(n)
        need(n)
        local v = s:sub(pos, pos + n - 1)
        pos = pos + n
        return v
    end
    local function push(v)
        stack[#stack + 1] = v
    end
    local function pop()
        local v = stack[#stack]
        if v == nil or v == MARK then
            error("pickle stack underflow", 0)
        end
        stack[#stack] = nil
        return v
    end
    local function top()
        local v = stack[#stack]
        if v == nil or v == MARK then
            error("pickle stack underflow", 0)
        end
        return v
    end
    local function pop_mark()
        local items = {}
        while true do
            local v = stack[#stack]
            if v == nil then
                error("could not find MARK", 0)
            end
            stack[#stack] = nil
            if v == MARK then
                break
            end
            table.insert(items, 1, v)
        end
        return items
    end
    local function note_global(g)
        local q = g.module .. "." .. g.name
        if not seen[q] then
            seen[q] = true
            globals[#globals + 1] = q
        end
    end
    local function set_item(dict, key, value)
        if type(dict) ~= "table" or dict.kind ~= "dict" then
            error("SETITEM on something other than a dict", 0)
        end
        dict.keys[#dict.keys + 1] = key
        dict.values[#dict.values + 1] = value
    end

    for _ = 1, MAX_OPCODES do
        need(1)
        local op = s:byte(pos)
        pos = pos + 1
        if op == 0x80 then -- PROTO
            protocol = arg(1)
        elseif op == 0x95 then -- FRAME
            arg(8)
        elseif op == 0x2e then -- STOP
            local result = pop()
            return { value = result, protocol = protocol, globals = globals, trailing = len - pos + 1 }
        elseif op == 0x28 then -- MARK
            push(MARK)
        elseif op == 0x30 then -- POP
            if stack[#stack] == MARK then
                stack[#stack] = nil
            else
                pop()
            end
        elseif op == 0x31 then -- POP_MARK
            pop_mark()
        elseif op == 0x4e then -- NONE
            push({ kind = "none" })
        elseif op == 0x88 or op == 0x89 then -- NEWTRUE, NEWFALSE
            push({ kind = "bool", value = op == 0x88 })
        elseif op == 0x4a then -- BININT (signed)
            local v = arg(4)
            if v >= 2 ^ 31 then
                v = v - 2 ^ 32
            end
            push({ kind = "int", text = int_text(v), value = v })
        elseif op == 0x4b then -- BININT1
            local v = arg(1)
            push({ kind = "int", text = int_text(v), value = v })
        elseif op == 0x4d then -- BININT2
            local v = arg(2)
            push({ kind = "int", text = int_text(v), value = v })
        elseif op == 0x8a or op == 0x8b then -- LONG1, LONG4
            local n = arg(op == 0x8a and 1 or 4)
            need(n)
            local t = long_text(s, pos, n)
            pos = pos + n
            push({ kind = "int", text = t, value = tonumber(t) })
        elseif op == 0x47 then -- BINFLOAT
            need(8)
            local v = be_double(s, pos)
            pos = pos + 8
            push({ kind = "float", text = float_repr(v), value = v })
        elseif op == 0x8c or op == 0x58 or op == 0x8d then -- SHORT_BINUNICODE, BINUNICODE(8)
            local n = arg(op == 0x8c and 1 or (op == 0x58 and 4 or 8))
            push({ kind = "str", value = text(n) })
        elseif op == 0x55 or op == 0x54 then -- SHORT_BINSTRING, BINSTRING (protocol 2)
            push({ kind = "str", value = text(arg(op == 0x55 and 1 or 4)) })
        elseif op == 0x43 or op == 0x42 then -- SHORT_BINBYTES, BINBYTES
            push({ kind = "bytes", value = text(arg(op == 0x43 and 1 or 4)) })
        elseif op == 0x5d then -- EMPTY_LIST
            push({ kind = "list", items = {} })
        elseif op == 0x61 then -- APPEND
            local v = pop()
            local l = top()
            if l.kind ~= "list" then
                error("APPEND to something other than a list", 0)
            end
            l.items[#l.items + 1] = v
        elseif op == 0x65 then -- APPENDS
            local items = pop_mark()
            local l = top()
            if l.kind ~= "list" then
                error("APPENDS to something other than a list", 0)
            end
            for _, v in ipairs(items) do
                l.items[#l.items + 1] = v
            end
        elseif op == 0x29 then -- EMPTY_TUPLE
            push({ kind = "tuple", items = {} })
        elseif op == 0x74 then -- TUPLE
            push({ kind = "tuple", items = pop_mark() })
        elseif op == 0x85 or op == 0x86 or op == 0x87 then -- TUPLE1..3
            local items = {}
            for k = op - 0x84, 1, -1 do
                items[k] = pop()
            end
            push({ kind = "tuple", items = items })
        elseif op == 0x7d then -- EMPTY_DICT
            push({ kind = "dict", keys = {}, values = {} })
        elseif op == 0x73 then -- SETITEM
            local v = pop()
            local k = pop()
            set_item(top(), k, v)
        elseif op == 0x75 then -- SETITEMS
            local items = pop_mark()
            local d = top()
            for k = 1, #items - 1, 2 do
                set_item(d, items[k], items[k + 1])
            end
        elseif op == 0x68 or op == 0x6a then -- BINGET, LONG_BINGET
            local index = arg(op == 0x68 and 1 or 4)
            if memo[index] == nil then
                error("memo index " .. index .. " not set", 0)
            end
            push(memo[index])
        elseif op == 0x71 or op == 0x72 then -- BINPUT, LONG_BINPUT
            memo[arg(op == 0x71 and 1 or 4)] = top()
        elseif op == 0x94 then -- MEMOIZE
            local n = 0
            for _ in pairs(memo) do
                n = n + 1
            end
            memo[n] = top()
        elseif op == 0x63 then -- GLOBAL: "module\nname\n"
            local a = s:find("\n", pos, true)
            local b = a and s:find("\n", a + 1, true)
            if not b then
                error("pickle data was truncated", 0)
            end
            local g = new_global(s:sub(pos, a - 1), s:sub(a + 1, b - 1))
            pos = b + 1
            note_global(g)
            push(g)
        elseif op == 0x93 then -- STACK_GLOBAL
            local name = pop()
            local module = pop()
            if module.kind ~= "str" or name.kind ~= "str" then
                error("STACK_GLOBAL needs two strings", 0)
            end
            local g = new_global(module.value, name.value)
            note_global(g)
            push(g)
        elseif op == 0x52 then -- REDUCE: a call, recorded, never made
            local args = pop()
            local callable = pop()
            push({ kind = "call", callable = callable, args = args })
        elseif op == 0x81 then -- NEWOBJ
            local args = pop()
            local cls = pop()
            push({ kind = "object", cls = cls, args = args })
        elseif op == 0x92 then -- NEWOBJ_EX
            pop()
            local args = pop()
            local cls = pop()
            push({ kind = "object", cls = cls, args = args })
        elseif op == 0x62 then -- BUILD
            local state = pop()
            local obj = top()
            obj.state = state
        else
            error(string.format("pickle opcode 0x%02x is not one the course programs use", op), 0)
        end
    end
    error("more than " .. MAX_OPCODES .. " opcodes", 0)
end

local function qualname(g)
    if type(g) == "table" and g.kind == "global" then
        local module = g.module
        if module == "__builtin__" or module == "exceptions" then
            module = "builtins"
        end
        return module .. "." .. g.name
    end
    return nil
end

-- The value of attribute `name` of a pickled object (its BUILD state dict).
local function attribute(obj, name)
    if type(obj) ~= "table" or obj.kind ~= "object" then
        return nil
    end
    local state = obj.state
    if type(state) == "table" and state.kind == "tuple" then
        state = state.items[1] -- (dict, slots)
    end
    if type(state) ~= "table" or state.kind ~= "dict" then
        return nil
    end
    for k, key in ipairs(state.keys) do
        if key.kind == "str" and key.value == name then
            return state.values[k]
        end
    end
    return nil
end

local function short(value, depth)
    depth = depth or 0
    if type(value) ~= "table" then
        return "?"
    end
    local kind = value.kind
    if kind == "int" or kind == "float" then
        return value.text
    elseif kind == "str" then
        return string.format("%q", value.value):gsub("\\\n", "\\n")
    elseif kind == "none" then
        return "None"
    elseif kind == "bool" then
        return value.value and "True" or "False"
    elseif kind == "global" then
        return qualname(value)
    elseif depth > 3 then
        return "..."
    elseif kind == "list" or kind == "tuple" then
        local parts = {}
        for k, v in ipairs(value.items) do
            if k > 6 then
                parts[#parts + 1] = "..."
                break
            end
            parts[#parts + 1] = short(v, depth + 1)
        end
        local inner = table.concat(parts, ", ")
        if kind == "list" then
            return "[" .. inner .. "]"
        end
        return "(" .. inner .. (#value.items == 1 and ",)" or ")")
    elseif kind == "object" then
        return (qualname(value.cls) or "?") .. "(...)"
    elseif kind == "call" then
        return (qualname(value.callable) or "?") .. short(value.args, depth + 1)
    end
    return "<" .. tostring(kind) .. ">"
end

-- The expression tree of a course pickle as infix text, written as our server
-- writes steps (PROTOCOL.md 4): binary operands bracketed, the outermost pair
-- left out, a negative base of ** bracketed.
local TOP, BARE, OPERAND, POW_BASE = 1, 2, 3, 4
local MAX_DEPTH = 400

local function infix(node, where, depth)
    if depth > MAX_DEPTH then
        error("expression nested too deeply", 0)
    end
    if type(node) ~= "table" or node.kind ~= "object" then
        error("unexpected " .. short(node) .. " in the expression", 0)
    end
    local class = qualname(node.cls)
    if class == "calculator.Constant" then
        local value = attribute(node, "value")
        if not value or (value.kind ~= "int" and value.kind ~= "float") then
            error("Constant without a number", 0)
        end
        local t = value.text
        if where == POW_BASE and t:sub(1, 1) == "-" then
            t = "(" .. t .. ")"
        end
        return t
    elseif class == "calculator.NamedConstant" then
        local name = attribute(node, "name")
        if not name or name.kind ~= "str" then
            error("NamedConstant without a name", 0)
        end
        return name.value
    elseif class == "calculator.BinaryExpr" then
        local op = attribute(attribute(node, "operator"), "symbol")
        if not op or op.kind ~= "str" then
            error("BinaryExpr without an operator symbol", 0)
        end
        local left = infix(attribute(node, "left_operand"),
            op.value == "**" and POW_BASE or OPERAND, depth + 1)
        local right = infix(attribute(node, "right_operand"), OPERAND, depth + 1)
        local t = left .. " " .. op.value .. " " .. right
        if where == TOP or where == BARE then
            return t
        end
        return "(" .. t .. ")"
    elseif class == "calculator.UnaryExpr" then
        local op = attribute(attribute(node, "operator"), "symbol")
        if not op or op.kind ~= "str" then
            error("UnaryExpr without an operator symbol", 0)
        end
        local t = op.value .. "(" .. infix(attribute(node, "operand"), BARE, depth + 1) .. ")"
        if where == POW_BASE then
            return "(" .. t .. ")"
        end
        return t
    elseif class == "calculator.FunctionCallExpr" then
        local name = attribute(attribute(node, "function"), "name")
        local args = attribute(node, "args")
        if not name or name.kind ~= "str" or not args or args.kind ~= "list" then
            error("FunctionCallExpr without a name or arguments", 0)
        end
        local inner = #args.items == 1 and BARE or OPERAND
        local parts = {}
        for k, a in ipairs(args.items) do
            parts[k] = infix(a, inner, depth + 1)
        end
        return name.value .. "(" .. table.concat(parts, ", ") .. ")"
    end
    error("unexpected " .. tostring(class) .. " in the expression", 0)
end

local function is_exception(value)
    return type(value) == "table" and value.kind == "call" and qualname(value.callable) ~= nil
        and type(value.args) == "table" and value.args.kind == "tuple"
end

-- ---------------------------------------------------------------------------
-- A JSON reader (RFC 8259), keeping numbers as the text they were sent as.
-- ---------------------------------------------------------------------------

local function utf8_char(cp)
    if cp < 0x80 then
        return string.char(cp)
    elseif cp < 0x800 then
        return string.char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
    elseif cp < 0x10000 then
        return string.char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return string.char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
        0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
    r = "\r", t = "\t" }

local function read_json(s)
    local pos = 1
    local function skip()
        pos = s:find("[^ \t\r\n]", pos) or (#s + 1)
    end
    local value
    local function str()
        pos = pos + 1 -- the opening quote
        local out = {}
        while true do
            local c = s:sub(pos, pos)
            if c == "" then
                error("unterminated string", 0)
            elseif c == '"' then
                pos = pos + 1
                return table.concat(out)
            elseif c == "\\" then
                local x = s:sub(pos + 1, pos + 1)
                if x == "u" then
                    local cp = tonumber(s:sub(pos + 2, pos + 5), 16)
                    if not cp then
                        error("bad \\u escape", 0)
                    end
                    pos = pos + 6
                    if cp >= 0xD800 and cp < 0xDC00 and s:sub(pos, pos + 1) == "\\u" then
                        local low = tonumber(s:sub(pos + 2, pos + 5), 16)
                        if low and low >= 0xDC00 and low < 0xE000 then
                            cp = 0x10000 + (cp - 0xD800) * 1024 + (low - 0xDC00)
                            pos = pos + 6
                        end
                    end
                    out[#out + 1] = utf8_char(cp)
                elseif ESCAPES[x] then
                    out[#out + 1] = ESCAPES[x]
                    pos = pos + 2
                else
                    error("bad escape", 0)
                end
            else
                local stop = s:find('["\\]', pos) or (#s + 1)
                out[#out + 1] = s:sub(pos, stop - 1)
                pos = stop
            end
        end
    end
    function value(depth)
        if depth > 100 then
            error("JSON nested too deeply", 0)
        end
        skip()
        local c = s:sub(pos, pos)
        if c == "{" then
            local obj = { kind = "object", keys = {}, values = {} }
            pos = pos + 1
            skip()
            if s:sub(pos, pos) == "}" then
                pos = pos + 1
                return obj
            end
            while true do
                skip()
                if s:sub(pos, pos) ~= '"' then
                    error("object key expected", 0)
                end
                local key = str()
                skip()
                if s:sub(pos, pos) ~= ":" then
                    error("':' expected", 0)
                end
                pos = pos + 1
                obj.keys[#obj.keys + 1] = key
                obj.values[key] = value(depth + 1)
                skip()
                c = s:sub(pos, pos)
                pos = pos + 1
                if c == "}" then
                    return obj
                elseif c ~= "," then
                    error("',' or '}' expected", 0)
                end
            end
        elseif c == "[" then
            local arr = { kind = "array", items = {} }
            pos = pos + 1
            skip()
            if s:sub(pos, pos) == "]" then
                pos = pos + 1
                return arr
            end
            while true do
                arr.items[#arr.items + 1] = value(depth + 1)
                skip()
                c = s:sub(pos, pos)
                pos = pos + 1
                if c == "]" then
                    return arr
                elseif c ~= "," then
                    error("',' or ']' expected", 0)
                end
            end
        elseif c == '"' then
            return { kind = "string", value = str() }
        end
        local number = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
        if number and number ~= "" and number ~= "-" then
            pos = pos + #number
            return { kind = "number", value = number }
        end
        for word, v in pairs({ ["true"] = true, ["false"] = false, null = "null" }) do
            if s:sub(pos, pos + #word - 1) == word then
                pos = pos + #word
                return { kind = "literal", value = v, text = word }
            end
        end
        error("unexpected " .. (c == "" and "end of data" or ("'" .. c .. "'")), 0)
    end
    local v = value(0)
    skip()
    if pos <= #s then
        error("extra data after the JSON value", 0)
    end
    return v
end

local function json_text(v)
    if v.kind == "string" then
        return v.value
    elseif v.kind == "number" then
        return v.value
    elseif v.kind == "literal" then
        return v.text
    end
    return "<" .. v.kind .. ">"
end

-- ---------------------------------------------------------------------------
-- Decoding the data of one message into the tree
-- ---------------------------------------------------------------------------

local function add_steps(tree, range, steps)
    local sub = tree:add(f.step_count, range, #steps)
    for _, step in ipairs(steps) do
        sub:add(f.steps, range, step)
    end
end

-- Returns a short summary for the Info column.
local function decode_pickle(tree, range, raw, is_request)
    local ok, read = pcall(read_pickle, raw)
    local proto = raw:byte(2) or 0
    local head = string.format("pickle, protocol %d, %d bytes", proto, #raw)
    if not ok then
        local item = tree:add(f.pickle, range, head)
        item:add_proto_expert_info(e.bad_data, "Pickle cannot be read: " .. read)
        return head
    end
    local item = tree:add(f.pickle, range, head)
    item:append_text(", " .. #read.globals .. " globals")
    item:add(f.pickle_protocol, range(1, 1))
    for _, q in ipairs(read.globals) do
        item:add(f.pickle_global, range, q)
    end
    if read.trailing > 0 then
        item:add_proto_expert_info(e.bad_data, read.trailing .. " bytes after the pickle's STOP")
    end
    local value = read.value
    if is_request then
        local ok2, text = pcall(infix, value, TOP, 0)
        if ok2 then
            tree:add(f.expression, range, text)
            return text
        end
        tree:add_proto_expert_info(e.bad_data, "Not a course expression: " .. text)
        return head
    end
    if type(value) == "table" and value.kind == "tuple" and #value.items == 2
        and (value.items[1].kind == "int" or value.items[1].kind == "float")
        and value.items[2].kind == "list" then
        tree:add(f.result, range, value.items[1].text)
        local steps = {}
        for _, s in ipairs(value.items[2].items) do
            steps[#steps + 1] = s.kind == "str" and s.value or short(s)
        end
        add_steps(tree, range, steps)
        return value.items[1].text
    elseif is_exception(value) then
        local kind = value.callable.name
        local parts = {}
        for _, a in ipairs(value.args.items) do
            parts[#parts + 1] = a.kind == "str" and a.value or short(a)
        end
        local message = table.concat(parts, ", ")
        tree:add(f.error_type, range, qualname(value.callable))
        tree:add(f.error, range, message)
        return kind .. ": " .. message
    end
    tree:add_proto_expert_info(e.bad_data, "Unexpected answer " .. short(value))
    return short(value)
end

local function decode_json(tree, range, raw)
    local ok, v = pcall(read_json, raw)
    if not ok then
        tree:add_proto_expert_info(e.bad_data, "JSON cannot be read: " .. v)
        return nil
    end
    if v.kind ~= "object" then
        tree:add_proto_expert_info(e.bad_data, "The JSON answer is not an object")
        return nil
    end
    local values = v.values
    if values.error then
        local message = json_text(values.error)
        local kind = values.type and json_text(values.type) or "Error"
        tree:add(f.error_type, range, kind)
        tree:add(f.error, range, message)
        return kind .. ": " .. message
    end
    if values.result then
        local result = json_text(values.result)
        tree:add(f.result, range, result)
        local steps = {}
        if values.steps and values.steps.kind == "array" then
            for _, s in ipairs(values.steps.items) do
                steps[#steps + 1] = json_text(s)
            end
        end
        add_steps(tree, range, steps)
        return result
    end
    tree:add_proto_expert_info(e.bad_data, "A JSON answer without result or error")
    return nil
end

local function decode_data(tree, range, is_request)
    local raw = range:raw()
    if raw:byte(1) == 0x80 then
        tree:add(f.encoding, range, "pickle")
        return decode_pickle(tree, range, raw, is_request)
    end
    if is_request then
        tree:add(f.encoding, range, "text")
        tree:add(f.expression, range, raw)
        return raw
    end
    tree:add(f.encoding, range, "JSON")
    return decode_json(tree, range, raw)
end

-- ---------------------------------------------------------------------------
-- Conversation state, built on the first pass over the packets
-- ---------------------------------------------------------------------------

-- Conversations are told apart by their addresses and ports (field values
-- such as tcp.stream are not available on a first pass without a tree).
local pending = {} -- conversation -> queue of unanswered requests (FIFO)
local pdus = {} -- "frame:offset:length" -> { request = ..., response = ... }
local broken = {} -- direction -> frame where an impossible length appeared
local ports = {} -- port number -> true, from the preference

local function endpoint(address, port)
    return tostring(address) .. ":" .. port
end

local function direction_of(pinfo)
    return endpoint(pinfo.src, pinfo.src_port) .. ">" .. endpoint(pinfo.dst, pinfo.dst_port)
end

local function conversation_of(pinfo)
    local a, b = endpoint(pinfo.src, pinfo.src_port), endpoint(pinfo.dst, pinfo.dst_port)
    if a > b then
        a, b = b, a
    end
    return a .. "=" .. b
end

function calc.init()
    pending, pdus, broken = {}, {}, {}
end

local function nstime(seconds)
    local nanoseconds = floor(seconds * 1e9 + 0.5)
    return NSTime.new(floor(nanoseconds / 1e9), nanoseconds % 1e9)
end

local function is_server_port(pinfo, port)
    return ports[port] or port == pinfo.match_uint
end

-- The record of this PDU: its matches, made on the first pass.
local function match(pinfo, tvb, is_request, tag)
    local key = pinfo.number .. ":" .. tvb:offset() .. ":" .. tvb:len()
    local record = pdus[key]
    if record or pinfo.visited then
        return record or {}
    end
    -- Relative times: a double holds them to the nanosecond, epoch times it does not.
    record = { frame = pinfo.number, time = pinfo.rel_ts, tag = tag }
    pdus[key] = record
    local conversation = conversation_of(pinfo)
    local queue = pending[conversation]
    if not queue then
        queue = { first = 1, last = 0 }
        pending[conversation] = queue
    end
    if is_request then
        queue.last = queue.last + 1
        queue[queue.last] = record
    elseif queue.first <= queue.last then
        local request = queue[queue.first]
        queue[queue.first] = nil
        queue.first = queue.first + 1
        request.response = record
        record.request = request
    end
    return record
end

-- ---------------------------------------------------------------------------
-- One message
-- ---------------------------------------------------------------------------

local function flags_summary(flags)
    local names = {}
    if bits(flags, 10, 1) == 1 then
        names[#names + 1] = "request"
    else
        names[#names + 1] = "response " .. flags % 1024
    end
    if bits(flags, 12, 1) == 1 then
        names[#names + 1] = "C"
    end
    if bits(flags, 11, 1) == 1 then
        names[#names + 1] = "S"
    end
    return table.concat(names, ", ")
end

local function ext_summary(ext)
    local names = {}
    if ext % 2 == 1 then
        names[#names + 1] = "L"
    end
    if bits(ext, 1, 1) == 1 then
        names[#names + 1] = "H"
    end
    if bits(ext, 2, 1) == 1 then
        names[#names + 1] = "G"
    end
    local tag = floor(ext / 8)
    if tag ~= 0 then
        names[#names + 1] = "tag " .. tag
    end
    return #names > 0 and table.concat(names, ", ") or "none"
end

-- Several messages in one frame share the Info column: the first replaces
-- what TCP wrote there, the others are appended.
local OUR_INFO = { "^Request", "^Response", "^Continuation after" }

local function set_info(pinfo, text)
    local current = tostring(pinfo.cols.info)
    for _, pattern in ipairs(OUR_INFO) do
        if current:find(pattern) then
            pinfo.cols.info:append(" ; " .. text)
            return
        end
    end
    pinfo.cols.info:set(text)
end

local function dissect_message(tvb, pinfo, tree)
    local available = tvb:len()
    local length = tvb(4, 2):uint()
    local flags = tvb(6, 2):uint()
    local cache_control = tvb(8, 2):uint()
    local ext = tvb(10, 2):uint()
    local is_request = bits(flags, 10, 1) == 1
    local status = flags % 1024
    local msg_length = math.min(math.max(length, HEADER_SIZE), available)

    pinfo.cols.protocol = "CALC"
    local root = tree:add(calc, tvb(0, msg_length))

    root:add(f.timestamp, tvb(0, 4), NSTime.new(tvb(0, 4):uint(), 0))
    local length_item = root:add(f.total_length, tvb(4, 2))
    local flags_item = root:add(f.flags, tvb(6, 2))
    flags_item:append_text(" (" .. flags_summary(flags) .. ")")
    local reserved_item = flags_item:add(f.reserved, tvb(6, 2))
    flags_item:add(f.cache, tvb(6, 2))
    flags_item:add(f.steps_flag, tvb(6, 2))
    flags_item:add(f.request, tvb(6, 2))
    local status_item = flags_item:add(f.status, tvb(6, 2))

    local cc_item = root:add(f.cache_control, tvb(8, 2))
    if bits(flags, 12, 1) == 0 then
        cc_item:append_text(is_request and " (ignored: C=0)" or " (not cacheable: C=0)")
    elseif cache_control == FOREVER then
        cc_item:append_text(is_request and " (any age)" or " (forever)")
    elseif cache_control == 0 then
        cc_item:append_text(is_request and " (reload)" or " (not cacheable)")
    else
        cc_item:append_text(is_request and " s (oldest accepted)" or " s")
    end

    local ext_item = root:add(f.ext, tvb(10, 2))
    ext_item:append_text(" (" .. ext_summary(ext) .. ")")
    ext_item:add(f.ext_framed, tvb(10, 2))
    ext_item:add(f.ext_from_cache, tvb(10, 2))
    ext_item:add(f.ext_grace, tvb(10, 2))
    ext_item:add(f.ext_tag, tvb(10, 2))

    -- What is wrong with the header
    if length < HEADER_SIZE then
        length_item:add_proto_expert_info(e.short_length,
            "Total length " .. length .. " is below 12: the stream cannot be resynchronised")
    elseif length > available then
        length_item:add_proto_expert_info(e.truncated, string.format(
            "Total length %d is beyond the data (%d bytes here)", length, available))
    elseif length > DEFAULT_MAX_MESSAGE then
        length_item:add_proto_expert_info(e.oversize)
    end
    if bits(flags, 13, 3) ~= 0 then
        reserved_item:add_proto_expert_info(e.reserved)
    end
    if is_request then
        if status ~= 0 then
            status_item:add_proto_expert_info(e.status, "Status " .. status .. " in a request")
        end
        if ext % 8 ~= 0 then
            ext_item:add_proto_expert_info(e.ext_request)
        end
        if is_server_port(pinfo, pinfo.src_port) and not is_server_port(pinfo, pinfo.dst_port) then
            root:add_proto_expert_info(e.wrong_direction, "Request (T=1) sent by a server port")
        end
    else
        if status ~= 200 and status ~= 400 and status ~= 500 then
            status_item:add_proto_expert_info(e.status,
                "Status " .. status .. " is not 200, 400 or 500")
        elseif status ~= 200 then
            status_item:add_proto_expert_info(e.error_answer,
                "Error answer " .. status .. " (" .. STATUS_NAMES[status] .. ")")
        end
        if bits(ext, 2, 1) == 1 and (bits(ext, 1, 1) == 0 or bits(flags, 12, 1) == 1) then
            ext_item:add_proto_expert_info(e.grace)
        end
        if is_server_port(pinfo, pinfo.dst_port) then
            root:add_proto_expert_info(e.wrong_direction,
                "Response (T=0) sent to a server port: the server answers 400")
        end
    end

    -- Data
    local summary
    local data_end = math.min(length, available)
    if data_end > HEADER_SIZE then
        local range = tvb(HEADER_SIZE, data_end - HEADER_SIZE)
        root:add(f.data, range):append_text(" (" .. range:len() .. " bytes)")
        summary = decode_data(root, range, is_request)
    end
    if length < HEADER_SIZE and available > HEADER_SIZE then
        root:add(f.data, tvb(HEADER_SIZE)):add_proto_expert_info(e.after_broken)
    end

    -- Matching. What a server port receives is a request to it, whatever
    -- its T bit says (it is answered, with a 400).
    local as_request = is_request
    local to_server = is_server_port(pinfo, pinfo.dst_port)
    if to_server ~= is_server_port(pinfo, pinfo.src_port) then
        as_request = to_server
    end
    local record = match(pinfo, tvb, as_request, floor(ext / 8))
    if as_request and record.response then
        root:add(f.response_in, tvb(0, 0), record.response.frame):set_generated()
    elseif not as_request then
        local request = record.request
        if request then
            root:add(f.request_in, tvb(0, 0), request.frame):set_generated()
            root:add(f.time, tvb(0, 0), nstime(record.time - request.time)):set_generated()
            if ext % 2 == 1 and floor(ext / 8) ~= request.tag and request.tag ~= 0 then
                root:add_proto_expert_info(e.tag_mismatch, string.format(
                    "Tag %d differs from its request's tag %d", floor(ext / 8), request.tag))
            end
        elseif pinfo.visited then
            root:add_proto_expert_info(e.unmatched)
        end
    end

    local kind
    if is_request then
        kind = "Request"
    else
        kind = "Response " .. status .. " " .. (STATUS_NAMES[status] or "unknown")
        if bits(ext, 1, 1) == 1 then
            kind = kind .. (bits(ext, 2, 1) == 1 and " (from cache, grace)" or " (from cache)")
        end
    end
    local text = kind
    if summary then
        text = text .. ": " .. summary
    end
    if length < HEADER_SIZE then
        text = text .. " [impossible total length " .. length .. "]"
    elseif length > available then
        text = text .. " [total length " .. length .. " beyond the data]"
    end
    root:append_text(", " .. text)
    set_info(pinfo, text)
    return available
end

-- The total length of the message at offset; the rest of the data for an
-- impossible one, which then stops the parsing of that direction.
local function message_length(tvb, pinfo, offset)
    local length = tvb(offset + 4, 2):uint()
    if length < HEADER_SIZE then
        if not pinfo.visited then
            local key = direction_of(pinfo)
            broken[key] = broken[key] or pinfo.number
        end
        return tvb:len() - offset
    end
    return length
end

function calc.dissector(tvb, pinfo, tree)
    local since = broken[direction_of(pinfo)]
    if since and pinfo.number > since then
        pinfo.cols.protocol = "CALC"
        local root = tree:add(calc, tvb())
        root:append_text(", bytes after an impossible total length")
        root:add(f.data, tvb()):add_proto_expert_info(e.after_broken)
        set_info(pinfo, "Continuation after an impossible total length (not parsed)")
        return tvb:len()
    end
    dissect_tcp_pdus(tvb, tree, HEADER_SIZE, message_length, dissect_message, true)
    return tvb:len()
end

-- ---------------------------------------------------------------------------
-- Registration
-- ---------------------------------------------------------------------------

local tcp_port = DissectorTable.get("tcp.port")
local registered = nil

local function register_ports()
    if registered then
        tcp_port:remove(registered, calc)
    end
    registered = tostring(calc.prefs.ports)
    ports = {}
    for part in registered:gmatch("[^,%s]+") do
        local low, high = part:match("^(%d+)-(%d+)$")
        low = tonumber(low or part)
        high = tonumber(high or part)
        if low and high then
            for p = low, math.min(high, 65535) do
                ports[p] = true
            end
        end
    end
    if registered ~= "" then
        tcp_port:add(registered, calc)
    end
end

function calc.prefs_changed()
    register_ports()
end

register_ports()
if tcp_port.add_for_decode_as then
    tcp_port:add_for_decode_as(calc)
end

# openpi norm_stats.json -> LeRobot normalizer state (safetensors), for openpi-to-pytorch.sh --lerobot.
#
#   awk -v map="state=observation.state,actions=action" -f norm-stats-safetensors.awk norm_stats.json
#
# Reads {"norm_stats": {KEY: {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, ...}}
# (openpi's normalize.save; any JSON layout), keeps the KEYs named in map under their new names,
# and prints:
#   dims<TAB>NEW<TAB>LENGTH            one line per kept key (the length of its first stat)
#   note<TAB>TEXT                      what was left out (keys not in map, null stats)
#   file<TAB>ESCAPED                   the safetensors file as printf %b escapes
# The file holds one float32 1-D tensor per stat, named NEW.STAT, laid out as the safetensors
# library lays it out (names sorted, header padded with spaces to 8 bytes). Each number becomes
# the float32 nearest the double the JSON text reads as (round to nearest even), which is what
# torch.tensor(list_of_floats, dtype=torch.float32) gives in LeRobot. Errors go to stderr, exit 65.
function fail(msg) { print "openpi-to-pytorch: " FILENAME ": " msg > "/dev/stderr"; failed = 1; exit 65 }
function pow2(k,   r) { r = 1; while (k > 0) { r *= 2; k-- } while (k < 0) { r /= 2; k++ } return r }
# The 4 little-endian bytes of the float32 nearest to the number written as s, as \xHH escapes.
function f32(s,   x, neg, a, e, f, fl, r, bits, out, k, b) {
    if (s == "NaN") bits = 2143289344
    else if (s == "Infinity") bits = 2139095040
    else if (s == "-Infinity") bits = 4286578688
    else {
        x = s + 0; neg = (substr(s, 1, 1) == "-")
        a = x < 0 ? -x : x
        if (a == 0) bits = 0
        else {
            e = 0
            while (a >= 2) { a /= 2; e++ }
            while (a < 1) { a *= 2; e-- }
            if (e >= -126) {
                f = (a - 1) * 8388608; fl = int(f); r = f - fl
                if (r > 0.5 || (r == 0.5 && fl % 2 == 1)) fl++
                if (fl == 8388608) { fl = 0; e++ }
                bits = e > 127 ? 2139095040 : (e + 127) * 8388608 + fl
            } else {
                f = a * pow2(e + 149); fl = int(f); r = f - fl
                if (r > 0.5 || (r == 0.5 && fl % 2 == 1)) fl++
                bits = fl
            }
        }
        if (neg) bits += 2147483648
    }
    out = ""
    for (k = 0; k < 4; k++) { b = bits % 256; bits = (bits - b) / 256; out = out sprintf("\\x%02x", b) }
    return out
}
# A scalar at the current place: keep it when it is norm_stats.KEY.STAT[i].
function scalar(tok,   key, stat, name) {
    if (depth == 4 && kind[1] == "o" && kname[1] == "norm_stats" && kind[2] == "o" && kind[3] == "o" && kind[4] == "a") {
        key = kname[2]; stat = kname[3]
        if (!(key in newname)) return
        if (tok !~ /^(-?[0-9]|NaN$|-?Infinity$)/) fail("norm_stats." key "." stat " holds " tok ", not a number")
        name = newname[key] "." stat
        if (!(name in count)) { names[++nnames] = name; count[name] = 0; if (!(newname[key] in dim)) { dim[newname[key]] = -1; keys[++nkeys] = newname[key] } }
        data[name] = data[name] f32(tok); count[name]++
        return
    }
    if (depth == 3 && kind[1] == "o" && kname[1] == "norm_stats" && kind[2] == "o" && kind[3] == "o" && (kname[2] in newname)) {
        if (tok == "null") { notes[++nnotes] = "norm_stats." kname[2] "." kname[3] " is null: left out"; return }
        fail("norm_stats." kname[2] "." kname[3] " is " tok ", not a list")
    }
    if (depth >= 4 && kind[1] == "o" && kname[1] == "norm_stats" && (kname[2] in newname)) fail("norm_stats." kname[2] "." kname[3] " is not a flat list of numbers")
}
BEGIN {
    n = split(map, pairs, ",")
    for (i = 1; i <= n; i++) { split(pairs[i], kv, "="); newname[kv[1]] = kv[2] }
    RS = "\001"  # the whole file is one record
}
{ text = text $0 }
END {
    if (failed) exit 65
    depth = 0; expectkey = 0; pos = 1; len = length(text)
    while (pos <= len) {
        c = substr(text, pos, 1)
        if (c ~ /[ \t\r\n]/) { pos++; continue }
        if (c == "{" || c == "[") {
            if (depth > 0 && kind[depth] == "a") idx[depth]++
            depth++; kind[depth] = (c == "{" ? "o" : "a"); idx[depth] = 0; kname[depth] = ""
            if (depth == 3 && kind[1] == "o" && kname[1] == "norm_stats" && kind[2] == "o") {
                if (!(kname[2] in newname)) notes[++nnotes] = "norm_stats." kname[2] " has no LeRobot feature: left out"
                else if (c == "[") fail("norm_stats." kname[2] " is not an object")
            }
            expectkey = (c == "{"); pos++; continue
        }
        if (c == "}" || c == "]") { depth--; expectkey = 0; pos++; continue }
        if (c == ",") { if (kind[depth] == "o") expectkey = 1; pos++; continue }
        if (c == ":") { expectkey = 0; pos++; continue }
        rest = substr(text, pos)
        if (c == "\"") {
            if (!match(rest, /^"([^"\\]|\\.)*"/)) fail("unterminated string at byte " pos)
            tok = substr(rest, 2, RLENGTH - 2); pos += RLENGTH
            if (expectkey) { kname[depth] = tok; continue }
            if (depth > 0 && kind[depth] == "a") idx[depth]++
            scalar("\"" tok "\""); continue
        }
        if (!match(rest, /^(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity)/)) fail("not JSON at byte " pos)
        tok = substr(rest, 1, RLENGTH); pos += RLENGTH
        scalar(tok)
    }
    if (depth != 0) fail("not JSON (unbalanced brackets)")
    if (text !~ /"norm_stats"/) fail("has no norm_stats")
    for (k in newname) if (!((newname[k]) in dim)) notes[++nnotes] = "norm_stats has no " k
    # Every stat of a key has the same length.
    for (i = 1; i <= nnames; i++) {
        name = names[i]; key = name; sub(/\.[^.]*$/, "", key)
        if (dim[key] == -1) dim[key] = count[name]
        else if (dim[key] != count[name]) fail(name " has " count[name] " numbers, other stats of " key " have " dim[key])
        if (count[name] == 0) fail(name " is empty")
    }
    # Names sorted (byte order), as safetensors lays them out when all share one dtype.
    for (i = 2; i <= nnames; i++) { v = names[i]; for (j = i - 1; j >= 1 && names[j] > v; j--) names[j + 1] = names[j]; names[j + 1] = v }
    header = "{"; off = 0; body = ""
    for (i = 1; i <= nnames; i++) {
        name = names[i]
        header = header (i > 1 ? "," : "") "\"" name "\":{\"dtype\":\"F32\",\"shape\":[" count[name] "],\"data_offsets\":[" off "," off + 4 * count[name] "]}"
        off += 4 * count[name]; body = body data[name]
    }
    header = header "}"
    while (length(header) % 8 != 0) header = header " "
    hl = length(header); size = ""
    for (k = 0; k < 8; k++) { b = hl % 256; hl = (hl - b) / 256; size = size sprintf("\\x%02x", b) }
    for (i = 1; i <= nkeys; i++) printf "dims\t%s\t%d\n", keys[i], dim[keys[i]]
    for (i = 1; i <= nnotes; i++) printf "note\t%s\n", notes[i]
    printf "file\t%s%s%s\n", size, header, body
}

# json-log.awk: the image's stderr as JSON lines for Cloud Logging. Every input line becomes one
# JSON object with a `severity`, nothing is dropped, each line is written (and flushed) as it
# arrives. Run with LC_ALL=C: the text is handled as bytes.
#
#   2026/12/01 19:09:32 [warn] 7#7: *3 message      nginx's error log (pid, connection kept)
#   nginx: [emerg] message                          nginx before its log is open (`nginx -t`)
#   mesh-entrypoint: [error] message                the image's entrypoint
#   anything else                                   severity DEFAULT, the line as the message
#
# JSON needs valid UTF-8: a line that is not is kept with its bytes >= 0x80 written as \u00XX.

BEGIN {
    sev["debug"] = "DEBUG"; sev["info"] = "INFO"; sev["notice"] = "NOTICE"
    sev["warn"] = "WARNING"; sev["error"] = "ERROR"; sev["crit"] = "CRITICAL"
    sev["alert"] = "ALERT"; sev["emerg"] = "EMERGENCY"
    for (i = 1; i < 256; i++) byte[sprintf("%c", i)] = i
    utf8 = "^([\001-\177]|[\302-\337][\200-\277]|\340[\240-\277][\200-\277]|[\341-\354\356\357][\200-\277][\200-\277]|\355[\200-\237][\200-\277]|\360[\220-\277][\200-\277][\200-\277]|[\361-\363][\200-\277][\200-\277][\200-\277]|\364[\200-\217][\200-\277][\200-\277])*$"
}

function esc(s,    out, i, c, n, high) {
    high = (s !~ utf8)
    if (s !~ /[\001-\037"\\\177]/ && !high) return s
    out = ""
    n = length(s)
    for (i = 1; i <= n; i++) {
        c = substr(s, i, 1)
        if (c == "\"") out = out "\\\""
        else if (c == "\\") out = out "\\\\"
        else if (c == "\t") out = out "\\t"
        else if (c == "\r") out = out "\\r"
        else if (byte[c] < 32 || byte[c] == 127 || (high && byte[c] >= 128)) out = out sprintf("\\u%04x", byte[c])
        else out = out c
    }
    return out
}

function emit(severity, message, extra) {
    printf "{\"severity\":\"%s\",%s\"message\":\"%s\"}\n", severity, extra, esc(message)
    fflush()
}

# nginx's error log: "YYYY/MM/DD HH:MM:SS [level] PID#TID: message"
/^[0-9][0-9][0-9][0-9]\/[0-9][0-9]\/[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9] \[[a-z]+\] [0-9]+#[0-9]+: / {
    level = substr($3, 2, length($3) - 2)
    if (level in sev) {
        rest = substr($0, 21 + length($3) + 1)
        pid = substr(rest, 1, index(rest, "#") - 1)
        rest = substr(rest, index(rest, ": ") + 2)
        stamp = ""
        if (utc) stamp = sprintf("\"time\":\"%s-%s-%sT%sZ\",", substr($1, 1, 4), substr($1, 6, 2), substr($1, 9, 2), $2)
        emit(sev[level], rest, stamp "\"logger\":\"nginx\",\"pid\":" pid ",")
        next
    }
}

# "nginx: [level] message" and "mesh-entrypoint: [level] message"
/^[a-z-]+: \[[a-z]+\] / {
    level = substr($2, 2, length($2) - 2)
    if (level in sev) {
        logger = substr($1, 1, length($1) - 1)
        emit(sev[level], substr($0, length($1) + length($2) + 3), "\"logger\":\"" logger "\",")
        next
    }
}

{ emit("DEFAULT", $0, "") }

#!/usr/bin/env bash
# gotest.sh ARGS...: go test -v ARGS, for the lab's tests.
#
# The output is printed as it comes, without go test's "=== RUN" lines.
# If the run fails, it ends with each failing test's own lines: its
# t.Log lines and its failure message, without the daemons' logs that a
# failing lab test prints (64 KiB of them, kept whole in
# /tmp/duet-lab-logs). Those logs would otherwise push the failure's
# reason out of the part of a long CI output that gets read: its tail.
#
# GO names the go command (default: go).
set -uo pipefail
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"${GO:-go}" test -v "$@" 2>&1 | tee "$out" | grep -v -e '^=== '
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
	echo
	echo "== go test failed (exit $rc). The failing tests' own lines, without the daemons' logs:"
	awk '
	# The last 200 lines kept, oldest first.
	function flush(  i) { for (i = (n > 200 ? n - 200 : 0); i < n; i++) print buf[i % 200] }
	# A top-level test starts: its lines so far are dropped.
	/^=== RUN   / { if ($3 !~ /\//) { n = 0; name = $3 } ; next }
	/^=== / { next }
	/^--- FAIL: / {
		dump = 0
		print ""
		print $0
		flush()
		failed = 1
		n = 0
		next
	}
	# The logs of the daemons that a failing lab test prints (lab.go: "--- a.log
	# (last 32 KiB ...") run until the next line a test logged.
	/^ +[A-Za-z0-9_]+\.go:[0-9]+: / { dump = ($0 ~ /^ +lab\.go:[0-9]+: --- .*\.log \(last/); buf[n % 200] = $0; n++; next }
	dump { next }
	{ buf[n % 200] = $0; n++ }
	# A panic or a timeout ends the binary without a --- FAIL line.
	END {
		if (!failed && n > 0) {
			print ""
			print "(no --- FAIL line: the test binary ended early; the last lines of " name ")"
			flush()
		}
	}' "$out"
fi
exit "$rc"

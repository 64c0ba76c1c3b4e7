package main

import (
	"bytes"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// Acks is what the counter's runs acknowledged, each run's values in the
// order it printed them, by run name.
type Acks map[string][]int

// ReadAcks adds one acks log (the output of a counter container, as
// `kubectl logs -f` gave it) to a. Lines other than "start RUN R" and
// "acked N" are the container's messages and are skipped; a last line
// without its newline was cut when the test stopped following the log.
func (a Acks) ReadAcks(name string, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return fmt.Errorf("acks log %s: %w", name, err)
	}
	if i := bytes.LastIndexByte(b, '\n'); i+1 < len(b) {
		b = b[:i+1]
	}
	run := ""
	for i, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0 || f[0] != "start" && f[0] != "acked":
		case f[0] == "start" && len(f) == 3 && number(f[2]) >= 0:
			run = f[1]
		case f[0] == "acked" && len(f) == 2 && number(f[1]) > 0 && run != "":
			a[run] = append(a[run], number(f[1]))
		case f[0] == "acked" && run == "":
			return fmt.Errorf("acks log %s line %d: %q before any start line: is it a counter's log from its beginning?", name, i+1, line)
		default:
			return fmt.Errorf("acks log %s line %d: %q: want \"start RUN N\" or \"acked N\"", name, i+1, line)
		}
	}
	return nil
}

// run is one start of the counter container as the file shows it.
type run struct {
	name   string
	line   int // of its start record
	resume int // the last value it found in the file
	values map[int]bool
	last   int // its last value in the file; resume when it wrote none
}

// Check reads the counter file and compares it with what the runs
// acknowledged. It returns the problems found, each naming the line or
// the run, and a summary of the runs for the test's log. The file is a
// sequence of runs: "start RUN R", then R+1, R+2, … one value a line,
// a value written twice when its first write reported an error. A last
// line without its newline was being written when the file was read.
func Check(counter io.Reader, acks Acks) (problems []string, summary string, err error) {
	b, err := io.ReadAll(counter)
	if err != nil {
		return nil, "", fmt.Errorf("counter file: %w", err)
	}
	bad := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	var runs []*run
	byName := map[string]*run{}
	// prev is the value the next line must follow; fresh is set right
	// after a start record, when the value cannot repeat.
	prev, fresh := 0, false
	// ackedMax is the highest value acknowledged by the runs before the
	// current one, ackedBy the run that did.
	ackedMax, ackedBy := 0, ""
	// The last element is "" after a final newline, or a line read while
	// the counter was writing it: ignored either way.
	lines := strings.Split(string(b), "\n")
	lines = lines[:len(lines)-1]
	for i, line := range lines {
		n := i + 1
		f := strings.Fields(line)
		switch {
		case len(f) == 3 && f[0] == "start" && number(f[2]) >= 0:
			name, resume := f[1], number(f[2])
			var cur *run
			if len(runs) > 0 {
				cur = runs[len(runs)-1]
			}
			if cur != nil && cur.name == name && fresh {
				// A start record written again after its write reported an error.
				if resume != cur.resume {
					bad("line %d: run %s starts again, resuming from %d instead of %d", n, name, resume, cur.resume)
				}
				continue
			}
			if r := byName[name]; r != nil {
				bad("line %d: run %s already started at line %d", n, name, r.line)
				continue
			}
			if cur != nil {
				if m := maxOf(acks[cur.name]); m > ackedMax {
					ackedMax, ackedBy = m, cur.name
				}
			}
			switch {
			case resume < ackedMax:
				bad("line %d: run %s resumes from %d, below %d acknowledged by run %s: values %s were lost and written again",
					n, name, resume, ackedMax, ackedBy, span(resume+1, ackedMax))
			case resume != prev:
				bad("line %d: run %s resumes from %d, but the value before it is %d", n, name, resume, prev)
			}
			r := &run{name: name, line: n, resume: resume, values: map[int]bool{}, last: resume}
			runs = append(runs, r)
			byName[name] = r
			prev, fresh = resume, true
		case len(f) == 1 && number(f[0]) > 0:
			v := number(f[0])
			if len(runs) == 0 {
				bad("line %d: value %d before any start record", n, v)
				prev = v
				continue
			}
			cur := runs[len(runs)-1]
			switch {
			case v == prev+1, v == prev && !fresh:
			case v > prev+1:
				bad("line %d: %d follows %d in run %s: %s missing", n, v, prev, cur.name, span(prev+1, v-1))
			default:
				bad("line %d: %d follows %d in run %s: the counter went back", n, v, prev, cur.name)
			}
			cur.values[v], cur.last = true, v
			prev, fresh = v, false
		default:
			bad("line %d: %q is neither \"start RUN N\" nor a value", n, line)
		}
	}

	names := make([]string, 0, len(acks))
	for name := range acks {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		acked := acks[name]
		if len(acked) == 0 {
			continue
		}
		r := byName[name]
		if r == nil {
			bad("run %s acknowledged %d values up to %d, but its start record is not in the file: all lost", name, len(acked), maxOf(acked))
			continue
		}
		var lost []int
		for _, v := range acked {
			if !r.values[v] {
				lost = append(lost, v)
			}
		}
		if len(lost) > 0 {
			bad("run %s: %d of its %d acknowledged values are not among its lines (%s; its last line holds %d)",
				name, len(lost), len(acked), spans(lost), r.last)
		}
	}

	var parts []string
	for _, r := range runs {
		p := fmt.Sprintf("%s resumed from %d, wrote up to %d", r.name, r.resume, r.last)
		if a := acks[r.name]; len(a) > 0 {
			p += fmt.Sprintf(", acknowledged up to %d (%d acks)", maxOf(a), len(a))
		}
		parts = append(parts, p)
	}
	summary = fmt.Sprintf("%d lines, runs: %s", len(lines), strings.Join(parts, "; "))
	return problems, summary, nil
}

// number is s as a decimal number of digits only, or -1.
func number(s string) int {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return -1
	}
	v, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return v
}

func maxOf(vs []int) int {
	if len(vs) == 0 {
		return 0
	}
	return slices.Max(vs)
}

// span is "a" or "a-b".
func span(a, b int) string {
	if a == b {
		return strconv.Itoa(a)
	}
	return fmt.Sprintf("%d-%d", a, b)
}

// spans writes sorted values as ranges: "3-7, 9".
func spans(vs []int) string {
	vs = slices.Clone(vs)
	slices.Sort(vs)
	var out []string
	for i := 0; i < len(vs); {
		j := i
		for j+1 < len(vs) && vs[j+1] <= vs[j]+1 {
			j++
		}
		out = append(out, span(vs[i], vs[j]))
		i = j + 1
	}
	return strings.Join(out, ", ")
}

package main

import (
	"fmt"
	"strings"
	"testing"
)

// file is a counter file: "start RUN R" records and the values from-to of
// each run, written as vagrant/counter.yaml writes them.
type part struct {
	start    string // a start record "RUN R", or "" for values
	from, to int
}

func counterFile(parts ...part) string {
	var b strings.Builder
	for _, p := range parts {
		if p.start != "" {
			fmt.Fprintf(&b, "start %s\n", p.start)
			continue
		}
		for v := p.from; v <= p.to; v++ {
			fmt.Fprintf(&b, "%d\n", v)
		}
	}
	return b.String()
}

func start(s string) part      { return part{start: s} }
func values(from, to int) part { return part{from: from, to: to} }

// acksLog is a counter's output: its start line and acks from-to.
func acksLog(run string, resume, from, to int) string {
	s := fmt.Sprintf("start %s %d\n", run, resume)
	for v := from; v <= to; v++ {
		s += fmt.Sprintf("acked %d\n", v)
	}
	return s
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string
		acks    []string
		problem string // in the problems; "" for none
	}{
		{
			name: "good: the unacknowledged tail survived, the next run resumes after it",
			file: counterFile(start("a 0"), values(1, 10), start("b 10"), values(11, 15)),
			acks: []string{acksLog("a", 0, 1, 8), acksLog("b", 10, 11, 14)},
		},
		{
			name: "good: the unacknowledged tail was lost, the next run writes it",
			file: counterFile(start("a 0"), values(1, 8), start("b 8"), values(9, 15)),
			acks: []string{acksLog("a", 0, 1, 8)},
		},
		{
			name: "good: a value whose write reported an error is written again, so is a start record",
			file: counterFile(start("a 0"), start("a 0"), values(1, 7), values(7, 9)),
			acks: []string{acksLog("a", 0, 1, 9)},
		},
		{
			// What the old check (sort -u, every value up to the last
			// acknowledged one present) passed: values 8-10 are there,
			// written by b.
			name:    "lost: the acknowledged tail was lost and written again after the resume",
			file:    counterFile(start("a 0"), values(1, 7), start("b 7"), values(8, 15)),
			acks:    []string{acksLog("a", 0, 1, 10)},
			problem: "line 9: run b resumes from 7, below 10 acknowledged by run a: values 8-10 were lost and written again",
		},
		{
			name:    "lost: the same, seen from the acknowledging run",
			file:    counterFile(start("a 0"), values(1, 7), start("b 7"), values(8, 15)),
			acks:    []string{acksLog("a", 0, 1, 10)},
			problem: "run a: 3 of its 10 acknowledged values are not among its lines (8-10; its last line holds 7)",
		},
		{
			name:    "gap below the last acknowledged value",
			file:    counterFile(start("a 0"), values(1, 5), values(7, 10)),
			acks:    []string{acksLog("a", 0, 1, 10)},
			problem: "line 7: 7 follows 5 in run a: 6 missing",
		},
		{
			name:    "gap after the last acknowledged value",
			file:    counterFile(start("a 0"), values(1, 5), values(9, 10)),
			acks:    []string{acksLog("a", 0, 1, 3)},
			problem: "line 7: 9 follows 5 in run a: 6-8 missing",
		},
		{
			name:    "a run starts from a value its file does not end with",
			file:    counterFile(start("a 0"), values(1, 5), start("b 9"), values(10, 12)),
			acks:    []string{acksLog("a", 0, 1, 5)},
			problem: "line 7: run b resumes from 9, but the value before it is 5",
		},
		{
			name:    "the counter goes back within a run",
			file:    counterFile(start("a 0"), values(1, 5), values(3, 4)),
			problem: "line 7: 3 follows 5 in run a: the counter went back",
		},
		{
			name:    "the acknowledging run's start record is lost",
			file:    counterFile(start("b 0"), values(1, 3)),
			acks:    []string{acksLog("a", 0, 1, 4)},
			problem: "run a acknowledged 4 values up to 4, but its start record is not in the file: all lost",
		},
		{
			name: "good: a last line being written when the file was read",
			file: counterFile(start("a 0"), values(1, 12)) + "1",
			acks: []string{acksLog("a", 0, 1, 12)},
		},
		{
			name:    "a line that is neither",
			file:    counterFile(start("a 0"), values(1, 2)) + "3 torn\n" + counterFile(values(3, 4)),
			problem: `line 4: "3 torn" is neither "start RUN N" nor a value`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			acks := Acks{}
			for i, a := range tc.acks {
				if err := acks.ReadAcks(fmt.Sprint("log", i), strings.NewReader(a)); err != nil {
					t.Fatal(err)
				}
			}
			problems, summary, err := Check(strings.NewReader(tc.file), acks)
			if err != nil {
				t.Fatal(err)
			}
			t.Log(summary)
			switch {
			case tc.problem == "" && len(problems) > 0:
				t.Errorf("want no problem, got:\n%s", strings.Join(problems, "\n"))
			case tc.problem != "" && !contains(problems, tc.problem):
				t.Errorf("want the problem\n  %s\ngot:\n  %s", tc.problem, strings.Join(problems, "\n  "))
			}
		})
	}
}

func contains(problems []string, want string) bool {
	for _, p := range problems {
		if p == want {
			return true
		}
	}
	return false
}

func TestReadAcks(t *testing.T) {
	for _, tc := range []struct {
		name, log string
		want      string // the acks as "run:values", or the error
	}{
		{"the container's messages are skipped", "start a 0\ntouch: /data/counter: Stale file handle\nacked 1\nacked 2\n", "a:[1 2]"},
		{"a last line cut when the stream stopped is ignored", "start a 0\nacked 1\nacked 2\nacked 2", "a:[1 2]"},
		{"acks follow the latest start", "start a 0\nacked 1\nstart b 1\nacked 2\n", "a:[1] b:[2]"},
		{"an ack before any start", "acked 1\n", `acks log l line 1: "acked 1" before any start line`},
		{"a garbled ack", "start a 0\nacked x\n", `acks log l line 2: "acked x": want "start RUN N" or "acked N"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			acks := Acks{}
			got := ""
			if err := acks.ReadAcks("l", strings.NewReader(tc.log)); err != nil {
				got = err.Error()
			} else {
				var parts []string
				for _, run := range []string{"a", "b"} {
					if v, ok := acks[run]; ok {
						parts = append(parts, fmt.Sprintf("%s:%v", run, v))
					}
				}
				got = strings.Join(parts, " ")
			}
			if !strings.HasPrefix(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

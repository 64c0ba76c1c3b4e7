package linearize

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var base = time.Now()

func at(ms int) time.Time { return base.Add(time.Duration(ms) * time.Millisecond) }

func put(client int, key, value string, call, ret int) Op {
	return Op{Client: client, Kind: Put, Key: key, Value: value, Call: at(call), Return: at(ret)}
}

func get(client int, key, output string, call, ret int) Op {
	return Op{Client: client, Kind: Get, Key: key, Output: output, Call: at(call), Return: at(ret)}
}

func unknownPut(client int, key, value string, call int) Op {
	return Op{Client: client, Kind: Put, Key: key, Value: value, Call: at(call), Unknown: true}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ops     []Op
		ok      bool
		badKeys string // in info when not ok
	}{
		{
			name: "concurrent reads see the old or the new value",
			ops: []Op{
				put(0, "x", "1", 0, 10),
				get(1, "x", "1", 5, 15),
				get(2, "x", "", 2, 8),
				put(0, "x", "2", 20, 30),
				get(2, "x", "1", 21, 25),
				get(1, "x", "2", 22, 35),
				get(2, "x", "2", 31, 40),
				put(1, "y", "a", 36, 50),
				get(0, "y", "a", 40, 45),
				get(2, "y", "a", 46, 60),
			},
			ok: true,
		},
		{
			name: "a key read before any put is missing",
			ops:  []Op{get(0, "x", "", 0, 1), put(0, "x", "1", 2, 3), get(1, "x", "1", 4, 5)},
			ok:   true,
		},
		{
			name: "an acknowledged write is lost",
			ops: []Op{
				put(0, "k", "4", 0, 10),
				put(0, "k", "5", 20, 30),
				get(1, "k", "4", 40, 50),
				put(1, "other", "1", 40, 50),
			},
			badKeys: `"k"`,
		},
		{
			name: "a stale read after another client read the new value",
			ops: []Op{
				put(0, "k", "4", 0, 5),
				put(0, "k", "5", 10, 20),
				get(1, "k", "5", 30, 40),
				get(2, "k", "4", 50, 60),
				get(1, "k", "5", 70, 80),
			},
			badKeys: `"k"`,
		},
		{
			name:    "a read of a value never written",
			ops:     []Op{put(0, "k", "1", 0, 5), get(1, "k", "2", 10, 20)},
			badKeys: `"k"`,
		},
		{
			name: "an unknown put that did not happen",
			ops: []Op{
				put(0, "k", "4", 0, 5),
				unknownPut(0, "k", "5", 10),
				get(1, "k", "4", 20, 30),
				get(1, "k", "4", 40, 50),
			},
			ok: true,
		},
		{
			name: "an unknown put that happened",
			ops: []Op{
				put(0, "k", "4", 0, 5),
				unknownPut(0, "k", "5", 10),
				get(1, "k", "4", 12, 18),
				get(1, "k", "5", 20, 30),
			},
			ok: true,
		},
		{
			name: "an unknown put cannot take effect before its call",
			ops: []Op{
				put(0, "k", "4", 0, 5),
				get(1, "k", "5", 6, 8),
				unknownPut(0, "k", "5", 10),
			},
			badKeys: `"k"`,
		},
		{
			name: "an unknown put, once read, cannot be undone",
			ops: []Op{
				put(0, "k", "4", 0, 5),
				unknownPut(0, "k", "5", 10),
				get(1, "k", "5", 20, 30),
				get(1, "k", "4", 40, 50),
			},
			badKeys: `"k"`,
		},
		{
			name: "an unknown get constrains nothing",
			ops: []Op{
				put(0, "k", "4", 0, 5),
				{Client: 1, Kind: Get, Key: "k", Output: "stale", Call: at(10), Unknown: true},
			},
			ok: true,
		},
		{
			name: "only the failing key is named",
			ops: []Op{
				put(0, "a", "1", 0, 5), get(1, "a", "1", 10, 15),
				put(0, "b", "1", 0, 5), get(1, "b", "", 10, 15),
				put(0, "c", "1", 0, 5), get(1, "c", "1", 10, 15),
			},
			badKeys: `"b"`,
		},
		{name: "an empty history", ok: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			html := filepath.Join(t.TempDir(), "history.html")
			ok, info, err := Check(tc.ops, 10*time.Second, html)
			if err != nil {
				t.Fatal(err)
			}
			if ok != tc.ok {
				t.Fatalf("Check = %v (%s), want %v", ok, info, tc.ok)
			}
			_, statErr := os.Stat(html)
			if ok {
				if statErr == nil {
					t.Errorf("a visualization was written for a linearizable history")
				}
				return
			}
			if want := "no linearization of key " + tc.badKeys + ";"; !strings.Contains(info, want) {
				t.Errorf("info %q does not say %q", info, want)
			}
			if !strings.Contains(info, html) {
				t.Errorf("info %q does not name the visualization %s", info, html)
			}
			if statErr != nil {
				t.Errorf("no visualization: %v", statErr)
			}
		})
	}
}

func TestCheckWithoutVisualization(t *testing.T) {
	ok, info, err := Check([]Op{put(0, "k", "1", 0, 5), get(1, "k", "", 10, 15)}, 0, "")
	if err != nil || ok || !strings.HasPrefix(info, "not linearizable") {
		t.Errorf("Check = %v, %q, %v; want false, not linearizable, no error", ok, info, err)
	}
}

// TestCheckUndecided gives the search no time: the verdict must not be
// taken for a pass.
func TestCheckUndecided(t *testing.T) {
	// Many concurrent puts of distinct values, each read back by a
	// concurrent get: many orders to try before any is found.
	var ops []Op
	for c := range 200 {
		ops = append(ops, put(c, "k", fmt.Sprint(c), 0, 1000), get(c+200, "k", fmt.Sprint((c+1)%200), 0, 1000))
	}
	ok, info, err := Check(ops, time.Nanosecond, filepath.Join(t.TempDir(), "history.html"))
	if err != nil {
		t.Fatal(err)
	}
	if ok || !strings.HasPrefix(info, "undecided") {
		t.Errorf("Check = %v, %q; want false, undecided", ok, info)
	}
}

func TestCheckRejectsMalformedOps(t *testing.T) {
	for _, tc := range []struct {
		op   Op
		want string
	}{
		{put(0, "k", "", 0, 1), "empty value"},
		{put(0, "k", "1", 5, 1), "before its call"},
		{Op{Kind: 7, Key: "k", Call: at(0), Return: at(1)}, "must be Put or Get"},
		{put(-1, "k", "1", 0, 1), "must be 0 or more"},
	} {
		_, _, err := Check([]Op{tc.op}, 0, "")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Check(%v) error = %v, want one saying %q", tc.op, err, tc.want)
		}
	}
}

// Unknown puts that no get read are left out of the search: many of them
// (a failover's timed-out writes) no longer make the check undecided, and
// what the other operations show is still found. One that a get read is
// kept: the read is explained by it.
func TestUnknownPutsNobodyReadDoNotSlowTheCheck(t *testing.T) {
	history := func(lost bool) []Op {
		var ops []Op
		for c := range 150 {
			ops = append(ops, unknownPut(c+10, "k", fmt.Sprintf("u%d", c), c))
		}
		ops = append(ops, put(0, "k", "1", 200, 210), get(1, "k", "1", 220, 230))
		if lost {
			ops = append(ops, get(2, "k", "", 240, 250)) // the acknowledged 1 is gone
		}
		return ops
	}
	ok, info, err := Check(history(false), 20*time.Second, "")
	if err != nil || !ok {
		t.Fatalf("150 unknown puts nobody read: Check = %v, %q, %v; want linearizable", ok, info, err)
	}
	ok, info, err = Check(history(true), 20*time.Second, "")
	if err != nil || ok || !strings.HasPrefix(info, "not linearizable") {
		t.Fatalf("a lost write among 150 unknown puts: Check = %v, %q, %v; want not linearizable", ok, info, err)
	}
	// The unknown put of "u" explains the read of "u" after the
	// acknowledged "1".
	read := []Op{put(0, "k", "1", 0, 10), unknownPut(1, "k", "u", 5), get(2, "k", "u", 20, 30)}
	if ok, info, err := Check(read, 20*time.Second, ""); err != nil || !ok {
		t.Fatalf("an unknown put that a get read: Check = %v, %q, %v; want linearizable", ok, info, err)
	}
}

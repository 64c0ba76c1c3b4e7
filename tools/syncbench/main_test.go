package main

import "testing"

// TestDiffCostsByThread: a thread that ended between the snapshots takes
// nothing away from the others (a whole-process difference went below
// zero, and the switches, unsigned, wrapped to about 1.8e19: from a
// review), one that began meanwhile counts from zero, and a reused thread
// number counts as a new thread.
func TestDiffCostsByThread(t *testing.T) {
	ps := []proc{{"daemon", 1}}
	before := []map[string]Cost{{
		"10": {CPUSeconds: 1, WaitSeconds: 2, Switches: 100},
		"11": {CPUSeconds: 5, WaitSeconds: 5, Switches: 500}, // ends
		"12": {CPUSeconds: 3, WaitSeconds: 3, Switches: 300}, // number reused
	}}
	after := []map[string]Cost{{
		"10": {CPUSeconds: 1.5, WaitSeconds: 2.25, Switches: 110},
		"12": {CPUSeconds: 0.25, WaitSeconds: 0.5, Switches: 4},
		"13": {CPUSeconds: 0.125, WaitSeconds: 0, Switches: 3}, // new
	}}
	got := diffCosts(ps, before, after)
	want := Cost{Name: "daemon", CPUSeconds: 0.5 + 0.25 + 0.125, WaitSeconds: 0.25 + 0.5, Switches: 10 + 4 + 3}
	if len(got) != 1 || got[0] != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

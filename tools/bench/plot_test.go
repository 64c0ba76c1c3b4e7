package main

import (
	"os"
	"path/filepath"
	"testing"
)

// TestPlotsWrite draws every kind of plot from made-up figures: the files
// must exist and be PNGs.
func TestPlotsWrite(t *testing.T) {
	var p plots
	p.addLatency("local", []float64{0.1, 0.2, 0.3})
	p.addLatency("duet exec, sync", []float64{1, 2, 3})
	p.bars = append(p.bars, barChart{file: "b.png", title: "t", unit: "s", labels: []string{"a\nx", "b"}, values: []float64{1, 2}})
	p.lagBounds, p.lagCounts = []float64{1, 2, 5}, []uint64{3, 5, 0, 0}
	p.lagSeries = []lagSample{{0.1, 3}, {0.2, 12.5}, {0.3, 0}}
	dir := t.TempDir()
	files, err := p.write(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 4 {
		t.Fatalf("wrote %v, want 4 plots", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil || len(b) < 8 || string(b[1:4]) != "PNG" {
			t.Fatalf("%s: not a PNG (%v)", filepath.Base(f), err)
		}
	}
}

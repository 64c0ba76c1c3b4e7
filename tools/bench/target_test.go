package main

import "testing"

func TestCrossesTarget(t *testing.T) {
	for _, c := range []struct {
		target string
		ratios []float64
		want   bool
	}{
		{"≥ 0.95", []float64{0.89, 0.98, 1.0}, true},
		{"≥ 0.95", []float64{0.96, 0.98, 1.0}, false},
		{"≥ 0.95", []float64{0.80, 0.90}, false},
		{"≤ 1.05", []float64{0.9, 1.1}, true},
		{"≤ 1.0 (max)", []float64{0.9, 0.99}, false},
		{"< 1.0", []float64{0.5, 1.0}, true},
		{"n/a", []float64{0.5, 1.5}, false},
		{"(context)", []float64{0.5, 1.5}, false},
	} {
		if got := crossesTarget(c.target, c.ratios); got != c.want {
			t.Errorf("crossesTarget(%q, %v) = %v, want %v", c.target, c.ratios, got, c.want)
		}
	}
}

package replica

import (
	"fmt"
	"os"
	"testing"
	"time"
)

// seededRuns runs fn as a subtest for each seed of a random test, until
// one fails or the time budget is spent, and returns how many ran. Its
// knobs are environment variables named from prefix: PREFIX_RUNS (how
// many, default runs), PREFIX_FIRST (the first seed, default first),
// PREFIX_SEED (replays that one seed alone), PREFIX_BUDGET (seconds,
// default budget; 0 for none).
func seededRuns(t *testing.T, prefix string, runs int, first uint64, budget time.Duration, fn func(t *testing.T, seed uint64)) int {
	t.Helper()
	if s := os.Getenv(prefix + "_RUNS"); s != "" {
		fmt.Sscan(s, &runs)
	}
	if s := os.Getenv(prefix + "_FIRST"); s != "" {
		fmt.Sscan(s, &first)
	}
	if s := os.Getenv(prefix + "_SEED"); s != "" {
		fmt.Sscan(s, &first)
		runs = 1
	}
	if s := os.Getenv(prefix + "_BUDGET"); s != "" {
		var n int
		fmt.Sscan(s, &n)
		budget = time.Duration(n) * time.Second
	}
	deadline := time.Now().Add(budget)
	ran := 0
	for i := range runs {
		if budget > 0 && time.Now().After(deadline) {
			break
		}
		seed := first + uint64(i)
		ran++
		if !t.Run(fmt.Sprint(seed), func(t *testing.T) { fn(t, seed) }) {
			break
		}
	}
	return ran
}

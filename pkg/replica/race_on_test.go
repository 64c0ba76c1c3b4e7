//go:build race

package replica

// raceEnabled: built with -race, whose bookkeeping makes a heap's figures
// and a test's pace something else than what they measure.
const raceEnabled = true

// Command workload makes seeded random changes of every kind duet
// replicates under a directory (see tools/lab.Workload). The demo uses it.
package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/duet-ha/duet/tools/lab"
)

func main() {
	dir := flag.String("dir", "", "directory to change")
	seed := flag.Int64("seed", 1, "random seed")
	ops := flag.Int("ops", 1000, "number of operations")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "workload: -dir is required")
		os.Exit(2)
	}
	if st, err := os.Stat(*dir); err != nil || !st.IsDir() {
		fmt.Fprintf(os.Stderr, "workload: -dir %q: not a directory\n", *dir)
		os.Exit(2)
	}
	w := lab.NewWorkload(*dir, *seed)
	if os.Getenv("DUET_WORKLOAD_LOG") != "" {
		w.Log = func(f string, a ...any) {
			fmt.Fprintf(os.Stderr, time.Now().UTC().Format("15:04:05.000000 ")+f+"\n", a...)
		}
	}
	w.Run(*ops)
	delete(w.Counts, "_n")
	var names []string
	for k := range w.Counts {
		names = append(names, k)
	}
	sort.Strings(names)
	fmt.Printf("workload: %d operations on %s (seed %d):", *ops, *dir, *seed)
	for _, k := range names {
		fmt.Printf(" %s=%d", k, w.Counts[k])
	}
	fmt.Println()
}

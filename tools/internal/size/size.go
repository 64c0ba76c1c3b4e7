// Package size reads the byte counts the benchmark tools take on their
// command lines.
package size

import (
	"fmt"
	"strconv"
	"strings"
)

// Parse reads 4096, 64K, 64KiB, 64kb, 1M, 1MiB, 1G, 1GiB (powers of
// 1024, any case).
func Parse(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	switch {
	case strings.HasSuffix(t, "K"):
		mult, t = 1<<10, t[:len(t)-1]
	case strings.HasSuffix(t, "M"):
		mult, t = 1<<20, t[:len(t)-1]
	case strings.HasSuffix(t, "G"):
		mult, t = 1<<30, t[:len(t)-1]
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("bad size %q: want a positive number, optionally with K, M or G (or KiB, MiB, GiB)", s)
	}
	return v * mult, nil
}

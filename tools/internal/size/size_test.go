package size

import "testing"

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
	}{
		{"4096", 4096}, {"64K", 64 << 10}, {"64KiB", 64 << 10}, {"1M", 1 << 20}, {"256MiB", 256 << 20},
		{"1G", 1 << 30}, {"2GiB", 2 << 30}, {"64kb", 64 << 10}, {"0", 0}, {"-1K", 0}, {"K", 0}, {"12X", 0}, {"", 0},
	} {
		got, err := Parse(c.in)
		if c.want == 0 {
			if err == nil {
				t.Errorf("Parse(%q) = %d, want an error", c.in, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Parse(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
}

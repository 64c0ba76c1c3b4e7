package replica

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSealedFramesNegotiated: over TLS a primary sends its batches sealed
// (no payload CRC, wire.FlagSealed) only to a secondary whose welcome
// says it accepts them; to one from before sealed frames, which refuses
// them as bad frames, it sends them with their CRC. Both replicate the
// tree; in plaintext nothing is sealed.
func TestSealedFramesNegotiated(t *testing.T) {
	for _, tc := range []struct {
		name                string
		plaintext, unsealed bool
	}{
		{"tls", false, false},
		{"tls, secondary from before sealed frames", false, true},
		{"plaintext", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lk := newTestLink([]byte("0123456789abcdef"), tc.plaintext)
			top := t.TempDir()
			logs := &syncBuffer{}
			sec := newTestSecondaryLink(t, filepath.Join(top, "state"), lk, slog.New(slog.NewTextHandler(logs, nil)))
			sec.unsealed = tc.unsealed
			src := filepath.Join(top, "src")
			os.Mkdir(src, 0o755)
			want := map[string][]byte{}
			for i := range 20 {
				b := make([]byte, 1000+i*70000) // up to 1.3 MB: several batches
				rand.Read(b)
				name := fmt.Sprintf("f%02d", i)
				want[name] = b
				os.WriteFile(filepath.Join(src, name), b, 0o644)
			}
			runPrimary(t, src, sec.addr, lk)
			waitFor(t, "the tree on the secondary", func() bool {
				for name, b := range want {
					got, err := os.ReadFile(filepath.Join(sec.data, name))
					if err != nil || !bytes.Equal(got, b) {
						return false
					}
				}
				return true
			})
			if strings.Contains(logs.String(), "bad frame") {
				t.Fatalf("the secondary refused a frame:\n%s", logs)
			}
			sealed := sec.sealed.Load()
			if want := !tc.plaintext && !tc.unsealed; want != (sealed > 0) {
				t.Fatalf("%d sealed frames received; want them: %v", sealed, want)
			}
		})
	}
}

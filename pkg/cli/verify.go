package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/wire"
	"github.com/spf13/cobra"
)

func newVerify(s IOStreams) *cobra.Command {
	var cfgPath, only string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Compare this node's copy with the peer's by checksum",
		Long: `verify scans the replicated directories here and asks the peer's daemon for
its own scan, then prints every difference: entries on one side only, type,
permissions, owner, size, symlink target and content (64 KiB block checksums).
Exit code 0 when identical, 1 when they differ, 2 on error. Run it when the
writers are quiet (see duet status --wait-sync), or it reports work in flight.`,
		Example: `  duet verify --config /etc/duet/duet.yaml
  duet verify --dir mysql`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cfgPath, false)
			if err != nil {
				return err
			}
			keys, err := cfg.ReadKeys()
			if err != nil {
				return err
			}
			lk, err := peerlink.New(peerlink.Options{Node: cfg.Node, Keys: keys, Plaintext: cfg.InsecurePlaintextLink})
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			total, found := 0, false
			for _, r := range cfg.Replicate {
				if only != "" && r.Name != only {
					continue
				}
				found = true
				n, err := verifyDir(ctx, s, lk, cfg.Peer, r)
				if err != nil {
					return err
				}
				total += n
			}
			if !found {
				return fmt.Errorf("--dir %q: no such replicated directory in %s", only, cfgPath)
			}
			if total > 0 {
				return &ExitError{Code: 1, Err: fmt.Errorf("%d differences", total)}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "/etc/duet/duet.yaml", "configuration file")
	cmd.Flags().StringVar(&only, "dir", "", "verify only this replicated directory (by name)")
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "give up after this long")
	return cmd
}

func verifyDir(ctx context.Context, s IOStreams, lk *peerlink.Link, peer string, r config.Replicate) (int, error) {
	root, err := fstree.OpenRoot(r.Path)
	if err != nil {
		return 0, err
	}
	defer root.Close()
	// Both sides read their whole tree: let them do it at the same time.
	type manifest struct {
		entries []wire.Entry
		err     error
	}
	peerc := make(chan manifest, 1)
	go func() {
		es, err := replica.FetchManifest(ctx, lk, peer, r.Name, nil)
		peerc <- manifest{es, err}
	}()
	local, tooLong, lerr := fstree.Scan(root, true)
	if lerr != nil {
		return 0, fmt.Errorf("scanning %s: %w", r.Path, lerr)
	}
	if tooLong > 0 {
		fmt.Fprintf(s.Err, "%s: %d entries not compared: their paths are longer than %d bytes, which duet does not replicate\n", r.Name, tooLong, wire.MaxPath)
	}
	m := <-peerc
	if m.err != nil {
		return 0, fmt.Errorf("asking %s for its copy of %q: %w", peer, r.Name, m.err)
	}
	remote := m.entries
	diffs := fstree.Compare(local, remote)
	for _, d := range diffs {
		fmt.Fprintf(s.Out, "%s: %q: %s\n", r.Name, d.Path, d.What)
	}
	var bytes uint64
	for _, e := range local {
		bytes += e.Size
	}
	if len(diffs) == 0 {
		fmt.Fprintf(s.Out, "%s: identical (%d entries, %s compared with %s)\n", r.Name, len(local), bytesOf(bytes), peer)
	}
	return len(diffs), nil
}

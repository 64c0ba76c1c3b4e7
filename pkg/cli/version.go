package cli

import (
	"fmt"
	"runtime"

	"github.com/duet-ha/duet/pkg/node"
	"github.com/duet-ha/duet/pkg/wire"
	"github.com/spf13/cobra"
)

func newVersion(s IOStreams) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			fmt.Fprintf(s.Out, "duet %s (protocol %d, %s)\n", node.Version, wire.Version, runtime.Version())
			return nil
		},
	}
}

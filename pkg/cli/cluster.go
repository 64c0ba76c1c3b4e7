package cli

import (
	"fmt"
	"time"

	"github.com/duet-ha/duet/pkg/node"
	"github.com/spf13/cobra"
)

// socketFlags adds --config and --socket and returns the socket to use.
func socketFlags(cmd *cobra.Command) func() (string, error) {
	var cfgPath, socket string
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "/etc/duet/duet.yaml", "configuration file (for the socket path)")
	cmd.Flags().StringVar(&socket, "socket", "", "control socket (overrides --config)")
	return func() (string, error) {
		if socket != "" {
			return socket, nil
		}
		cfg, err := loadConfig(cfgPath, true)
		if err != nil {
			return "", err
		}
		return cfg.Socket, nil
	}
}

func clusterCommands(s IOStreams) []*cobra.Command {
	// simple makes a command that sends one request to the daemon and
	// prints its answer; req is read when the command runs (flags set).
	simple := func(use, short, long string, req func() string) *cobra.Command {
		cmd := &cobra.Command{Use: use, Short: short, Long: long, Args: cobra.NoArgs}
		sock := socketFlags(cmd)
		cmd.RunE = func(cmd *cobra.Command, _ []string) error {
			socket, err := sock()
			if err != nil {
				return err
			}
			reply, err := node.Command(socket, req())
			if err != nil {
				return err
			}
			fmt.Fprintln(s.Out, reply)
			return nil
		}
		return cmd
	}
	fixed := func(req string) func() string { return func() string { return req } }
	start := simple("start", "Let this node take part in the cluster again (after duet stop)",
		"start moves a stopped node to WAIT: it resynchronises from a serving peer, or serves if its copy is the reference.", fixed("start"))
	stop := simple("stop", "Stop the module on this node (services, VIP, replication role)",
		`stop leaves the cluster: on the primary the services stop, every change is
shipped, the VIP is removed and, if the peer is in sync, it takes over. The
daemon keeps running (STOP) until duet start.`, fixed("stop"))
	second := simple("second", "Give the primary role to the peer (as swap) and stay secondary", "", fixed("second"))

	var force bool
	prim := simple("prim", "Make this node the primary",
		`prim makes a waiting node the primary when the peer is not serving. A copy
that may be older than the peer's (it was secondary when it last stopped) is
refused unless --force: then changes only the peer had are lost, and the
command says so.`, func() string {
			if force {
				return "prim-force"
			}
			return "prim"
		})
	prim.Example = "  duet prim\n  duet prim --force   # accept losing what only the peer had"
	prim.Flags().BoolVar(&force, "force", false, "serve even with a copy that may be stale")

	var wait time.Duration
	swap := &cobra.Command{
		Use:   "swap",
		Short: "Move the primary role to the peer with no data loss",
		Long: `swap, run on the primary, stops its services, ships every change to the
peer, removes the VIP and hands over; the peer then takes the VIP and starts
the services. Refused when the peer is not in sync.`,
		Args: cobra.NoArgs,
	}
	ssock := socketFlags(swap)
	swap.Flags().DurationVar(&wait, "wait", 60*time.Second, "how long to wait for the peer to serve")
	swap.RunE = func(cmd *cobra.Command, _ []string) error {
		socket, err := ssock()
		if err != nil {
			return err
		}
		start := time.Now()
		if _, err := node.Command(socket, "swap"); err != nil {
			return err
		}
		deadline := start.Add(wait)
		for {
			st, err := node.Query(socket)
			if err != nil {
				return err
			}
			if st.PeerState.Seen && (st.PeerState.State == "PRIM" || st.PeerState.State == "ALONE") {
				fmt.Fprintf(s.Out, "swapped: %s is %s, this node is %s (%.1f s)\n", st.PeerState.Name, st.PeerState.State, st.State, time.Since(start).Seconds())
				return nil
			}
			if st.State == "PRIM" || st.State == "ALONE" {
				// The peer went away during the handover: this node took
				// the role back once it was declared lost.
				return &ExitError{Code: 1, Err: fmt.Errorf("swap did not complete: the peer (%s) did not take over and this node serves again (%s)", st.PeerState.State, st.State)}
			}
			if time.Now().After(deadline) {
				return &ExitError{Code: 1, Err: fmt.Errorf("handed over, but the peer does not serve after %s (peer %s)", wait, st.PeerState.State)}
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return []*cobra.Command{start, stop, prim, second, swap}
}

package cli

import (
	"context"
	"os"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/node"
	"github.com/duet-ha/duet/pkg/sysmon"
	"github.com/spf13/cobra"
)

func newExec(s IOStreams) *cobra.Command {
	var sock func() (string, error)
	cmd := &cobra.Command{
		Use:   "exec [flags] -- COMMAND [ARGS...]",
		Short: "Run a command whose fsyncs wait until its data is on the peer",
		Long: `exec runs COMMAND (and every process it starts) under a seccomp filter: its
fsync, fdatasync, sync_file_range, msync, syncfs and sync calls, and its writes
to files opened with O_SYNC or O_DSYNC (or pwritev2 with RWF_DSYNC), and
their Linux AIO forms (io_submit), return once the primary's duet daemon has every change made so far applied and
synced on the peer. If the daemon cannot confirm it, the call fails with EIO
instead of claiming durability. With no peer in sync for the fault-detection
timeout the node runs alone and the calls are released (or fail with EIO when
cluster.alone_writes is fail). A directory in async mode holds them only while
its lag exceeds max_lag. io_uring_setup and x32 calls fail with ENOSYS, so
programs fall back to plain syscalls. Exit status and signals are those of COMMAND;
duet exec returns once COMMAND and every process it started have exited (they
all run under the filter, and need duet exec to answer their calls). If duet
exec itself is killed, COMMAND and every process under it are killed too, and
until then their durability calls fail with EIO.`,
		Example: `  duet exec -- mariadbd --datadir /srv/mysql
  duet exec --config /etc/duet/duet.yaml -- ./writer`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			socket, err := sock()
			if err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			slack, err := sysmon.SlackFromEnv()
			if err != nil {
				return err
			}
			// The outcome is not said: the command's stderr is the
			// operator's, and duet exec run by a user without
			// CAP_SYS_NICE keeps the kernel's slack, as it did.
			sysmon.Relax(slack, nil)
			client := node.NewBarrierClient(socket)
			code, err := barrier.Exec(context.Background(), self, args, func(int32) error {
				return client.Wait()
			}, client.Report)
			if err != nil {
				return err
			}
			if code != 0 {
				return &ExitError{Code: code, Err: errSilentExit}
			}
			return nil
		},
	}
	sock = socketFlags(cmd)
	return cmd
}

func newSupervisedChild() *cobra.Command {
	return &cobra.Command{
		Use:                barrier.ChildCommand,
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 && args[0] == "--" {
				args = args[1:]
			}
			return barrier.RunChild(args)
		},
	}
}

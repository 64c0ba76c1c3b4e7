// Package cli holds duet's commands. Each takes IOStreams so that its
// output can be tested.
package cli

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/spf13/cobra"
)

// IOStreams are a command's standard streams.
type IOStreams struct {
	In       io.Reader
	Out, Err io.Writer
}

// Std returns the process's streams.
func Std() IOStreams { return IOStreams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr} }

// ExitError carries a specific exit code (verify: 1 = copies differ).
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string { return e.Err.Error() }

func (e *ExitError) Unwrap() error { return e.Err }

// errSilentExit passes a command's exit status through without a message.
var errSilentExit = errors.New("exit status passed through")

// New builds the root command.
func New(s IOStreams) *cobra.Command {
	root := &cobra.Command{
		Use:           "duet",
		Short:         "Two-node high availability with synchronous file replication",
		Long:          "duet mirrors directories between two Linux servers byte for byte, capturing changes with eBPF tracepoints.",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(s.Out)
	root.SetErr(s.Err)
	root.SetIn(s.In)
	root.AddCommand(newRun(s), newStatus(s), newVerify(s), newVersion(s), newExec(s), newResync(s), newInit(s), newNFSServe(s), newSupervisedChild())
	root.AddCommand(clusterCommands(s)...)
	return root
}

// Main runs the CLI and returns the process exit code.
func Main(s IOStreams, args []string) int {
	root := New(s)
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee *ExitError
	if !errors.Is(err, errSilentExit) {
		fmt.Fprintln(s.Err, "duet:", err)
	}
	if errors.As(err, &ee) {
		return ee.Code
	}
	return 2
}

// loadConfig loads the configuration at path; a missing file gets the
// ways round it: the --config flag, --socket for the commands that have it
// (socket), or duet init k3s to write one.
func loadConfig(path string, socket bool) (*config.Config, error) {
	cfg, err := config.Load(path)
	if errors.Is(err, fs.ErrNotExist) {
		if socket {
			return nil, fmt.Errorf("%w: name the configuration with --config PATH or the daemon's control socket with --socket PATH, or write one (duet init k3s, or from /usr/share/doc/duet/examples/duet.yaml)", err)
		}
		return nil, fmt.Errorf("%w: name the configuration with --config PATH, or write one (duet init k3s, or from /usr/share/doc/duet/examples/duet.yaml)", err)
	}
	return cfg, err
}

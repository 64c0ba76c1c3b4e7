package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/duet-ha/duet/pkg/aiosync"
	"github.com/duet-ha/duet/pkg/node"
	"github.com/duet-ha/duet/pkg/sysmon"
	"github.com/spf13/cobra"
)

// preflight is node.Preflight; the command's tests replace it, as the
// host checks depend on the machine (pkg/node tests them).
var preflight = node.Preflight

// problemList is nil for no problems, else one error listing them all,
// one a line, under what.
func problemList(what string, problems []error) error {
	switch len(problems) {
	case 0:
		return nil
	case 1:
		return fmt.Errorf("%s: %w", what, problems[0])
	}
	msg := fmt.Sprintf("%s: %d problems:", what, len(problems))
	for _, p := range problems {
		msg += "\n  " + p.Error()
	}
	return errors.New(msg)
}

func newRun(s IOStreams) *cobra.Command {
	var cfgPath, role, logLevel string
	var check bool
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the duet daemon",
		Long: `Run the duet daemon. With --check, only check: the configuration
(every problem of the file at once, by line), then this host: each
replicated directory's filesystem, the VIP's interface, that listen and
the heartbeat addresses are this host's and their ports free, that the
BPF programs load, and the hooks they would attach. Exit 0 when all pass.`,
		Example: `  duet run --config /etc/duet/duet.yaml
  duet run --check
  duet run --config lab.yaml --role secondary`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cfgPath, false)
			if err != nil {
				return err
			}
			if role != "" {
				cfg.Role = role
				if err := cfg.Validate(); err != nil {
					return err
				}
			}
			slack, err := sysmon.SlackFromEnv()
			if err != nil {
				return err
			}
			if check {
				fmt.Fprintf(s.Out, "config %s: ok\n", cfgPath)
				found, problems := preflight(cfg)
				for _, f := range found {
					fmt.Fprintf(s.Out, "  %s\n", f)
				}
				return problemList("this host", problems)
			}
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(s.Err, &slog.HandlerOptions{Level: lvl})).With("node", cfg.Node)
			if err := aiosync.Available(); err != nil {
				log.Warn("durability calls' early flushes hold a Go P each: Linux AIO is not available", "err", err)
			}
			sysmon.Relax(slack, func(tid int, err error) {
				if err != nil {
					log.Warn("the Go runtime's monitor keeps its timer slack", "err", err)
					return
				}
				log.Info("the Go runtime's monitor naps with more timer slack", "thread", tid, "slack", slack, "set_by", sysmon.EnvSlack)
			})
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return node.Run(ctx, cfg, log)
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "/etc/duet/duet.yaml", "configuration file")
	cmd.Flags().StringVar(&role, "role", "", "override the configured role (primary or secondary)")
	cmd.Flags().BoolVar(&check, "check", false, "check the configuration and this host (see above), and exit")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}

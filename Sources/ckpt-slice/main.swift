import Glibc
import Shared

exit(PendingStageCommand.run(name: "ckpt-slice", issue: "issue 6", arguments: Array(CommandLine.arguments.dropFirst())))

import Glibc
import Shared

exit(PendingStageCommand.run(name: "lora-merge", issue: "issue 5", arguments: Array(CommandLine.arguments.dropFirst())))

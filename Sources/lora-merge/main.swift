import Shared

LoRAMergeCommand.main()

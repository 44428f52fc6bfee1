import Shared

DiffCommand.main()

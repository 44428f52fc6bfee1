import Shared

WriteCommand.main()

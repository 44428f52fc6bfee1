// What a build was made from: scripts/package.sh compiles release builds with
// -Xcc -DCKPT_COMMIT='"<git commit>"'; a plain `swift build` has none.
#ifndef CKPT_BUILD_INFO_H
#define CKPT_BUILD_INFO_H

/// The git commit the binary was built from ("" when the build did not say).
const char *ckpt_build_commit(void);

#endif

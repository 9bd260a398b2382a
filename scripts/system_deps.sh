#!/usr/bin/env bash
# Install the image-library headers pillow-simd compiles against (WebP, TIFF, LCMS, JPEG, zlib).
# Without them pillow-simd still builds but cannot decode WebP/TIFF: say so plainly, never fail here.
set -u
pkgs="libjpeg-dev zlib1g-dev libwebp-dev libtiff-dev liblcms2-dev"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -z "$missing" ]; then
    echo "system image headers: all present ($pkgs)"; exit 0
  fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system image headers:$missing"
    apt-get install -y -q $missing >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null 2>&1; } \
      || echo "WARNING: could not install$missing; pillow-simd will lack the matching formats (see 'navit doctor')"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get install -y -q $missing >/dev/null 2>&1 \
      || echo "WARNING: could not install$missing; pillow-simd will lack the matching formats (see 'navit doctor')"
  else
    echo "WARNING: missing system packages:$missing (not root, no sudo)."
    echo "         pillow-simd will build without them: WebP/TIFF/colour management may be unavailable."
    echo "         Install them with your package manager and run 'make clean-venv setup'."
  fi
else
  echo "NOTE: not a Debian system; make sure libjpeg, zlib, libwebp, libtiff and lcms2 headers are installed"
  echo "      before pillow-simd builds, or it will lack those formats (check with 'navit doctor')."
fi
exit 0
